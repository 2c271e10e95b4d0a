"""Checkpoints: atomic files, the newest K kept, loaded without unpickling code, and exact resumes."""

import logging
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit import Callback, CheckpointError, EarlyStopping, Trainer
from batchfit.train import checkpoint as ckpt


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def step_files(*steps: int) -> list[str]:
    return sorted(f"step-{s:09d}.pt" for s in steps)


def make_run(folder, seed_model: int = 0, optimizer: str = "adam", **options):
    """A small run with dropout (so the RNG matters), Adam and shuffling."""
    torch.manual_seed(seed_model)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 3))
    make_optimizer = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    options.setdefault("batch_size", 16)
    options.setdefault("progress", False)
    return Trainer(model, F.cross_entropy, make_optimizer(model.parameters(), lr=0.01), checkpoint_dir=folder,
                   **options)


def assert_same_weights(first: Trainer, second: Trainer) -> None:
    a, b = first.module.state_dict(), second.module.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class CrashAt(Callback):
    """Raises after step ``step``, as a crash would interrupt the run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt(f"crash after step {self.step}")


# ---------------------------------------------------------------------------- files
def test_save_checkpoint_leaves_only_complete_files(tmp_path):
    path = ckpt.save_checkpoint({"w": torch.ones(3)}, tmp_path, 7, keep=3)
    assert names(tmp_path) == step_files(7)
    assert path == tmp_path / "step-000000007.pt"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_save_checkpoint_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"w": torch.ones(3)}, tmp_path, 1, keep=3)

    def broken_save(state, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"w": torch.zeros(3)}, tmp_path, 2, keep=3)
    assert names(tmp_path) == step_files(1)


def test_checkpoint_stale_temporary_file_is_ignored_and_removed(tmp_path):
    ckpt.save_checkpoint({"w": torch.ones(1)}, tmp_path, 3, keep=3)
    stale = tmp_path / ".step-000000004.pt.999999.tmp"  # left by a process killed while writing
    stale.write_bytes(b"\x00" * 10)
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "step-000000003.pt"]
    state, path = ckpt.load_latest(tmp_path)
    assert path.name == "step-000000003.pt"
    ckpt.save_checkpoint({"w": torch.ones(1)}, tmp_path, 5, keep=3)
    assert names(tmp_path) == step_files(3, 5)


def test_save_checkpoint_keeps_the_newest(tmp_path):
    for step in range(1, 8):
        ckpt.save_checkpoint({"step": step}, tmp_path, step, keep=2)
    assert names(tmp_path) == step_files(6, 7)
    assert ckpt.load_latest(tmp_path)[0] == {"step": 7}


@pytest.mark.parametrize("keep", [1, 2])
def test_save_checkpoint_never_prunes_the_file_it_wrote(tmp_path, keep):
    ckpt.save_checkpoint({"step": 3}, tmp_path, 3, keep=3)
    (tmp_path / "step-000000009.pt").write_bytes(b"damaged")  # newer, but unreadable: a resume skipped it
    ckpt.save_checkpoint({"step": 5}, tmp_path, 5, keep=keep)
    assert names(tmp_path) == (step_files(5) if keep == 1 else step_files(5, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state, path = ckpt.load_latest(tmp_path)
    assert state == {"step": 5}


def test_trainer_keeps_the_newest_checkpoints(tmp_path, classification):
    trainer = make_run(tmp_path, checkpoint_every=2, keep_checkpoints=3)
    trainer.fit(classification, epochs=2)  # 7 steps an epoch
    assert names(tmp_path) == step_files(10, 12, 14)


class Payload:
    """An object whose unpickling would run code (it would create a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_pickled_objects(tmp_path):
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1, keep=3)
    marker = tmp_path / "code-ran"
    torch.save({"step": 2, "payload": Payload(str(marker))}, tmp_path / "step-000000002.pt")
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable checkpoint .*step-000000002\.pt"):
        state, path = ckpt.load_latest(tmp_path)
    assert state == {"step": 1}
    assert not marker.exists()


def test_load_uses_weights_only(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1, keep=3)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", spy)
    ckpt.load_latest(tmp_path)
    assert seen == [True]


def test_trainer_checkpoint_loads_with_weights_only(tmp_path, classification):
    trainer = make_run(tmp_path, checkpoint_every=3)
    trainer.fit(classification, epochs=1)
    state = torch.load(tmp_path / "step-000000007.pt", weights_only=True)
    assert state["step"] == 7 and state["batcher"]["epoch"] == 1 and state["batcher"]["samples_done"] == 0
    assert state["config"]["batch_size"] == 16 and state["config"]["seed"] == 0


# ---------------------------------------------------------------------------- resume
def test_resume_without_checkpoints_starts_fresh(tmp_path, classification):
    fresh = make_run(tmp_path / "a")
    fresh.fit(classification, epochs=2)
    resumed = make_run(tmp_path / "b")
    resumed.fit(classification, epochs=2, resume=True)
    assert_same_weights(fresh, resumed)


def test_resume_after_whole_epochs_is_exact(tmp_path, classification):
    uninterrupted = make_run(tmp_path / "a")
    uninterrupted.fit(classification, epochs=4)
    first = make_run(tmp_path / "b")
    first.fit(classification, epochs=2)
    second = make_run(tmp_path / "b", seed_model=1)  # other initial weights: all comes from the checkpoint
    history = second.fit(classification, epochs=4, resume=True)
    assert_same_weights(uninterrupted, second)
    assert history.losses() == uninterrupted.history.losses()
    assert [r["step"] for r in history.steps] == list(range(1, 29))


@pytest.mark.parametrize(("crash_after", "prefetch"), [(5, 0), (10, 0), (16, 2)])
def test_resume_after_a_crash_mid_epoch_is_exact(tmp_path, classification, crash_after, prefetch):
    uninterrupted = make_run(tmp_path / "a", checkpoint_every=3, prefetch=prefetch)
    uninterrupted.fit(classification, epochs=3)
    crashing = make_run(tmp_path / "b", checkpoint_every=3, prefetch=prefetch, callbacks=[CrashAt(crash_after)])
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(classification, epochs=3)
    resumed = make_run(tmp_path / "b", checkpoint_every=3, prefetch=prefetch, seed_model=1)
    history = resumed.fit(classification, epochs=3, resume=True)
    assert_same_weights(uninterrupted, resumed)
    assert history.losses() == uninterrupted.history.losses()
    assert [e["loss"] for e in history.epochs] == [e["loss"] for e in uninterrupted.history.epochs]


def test_resume_of_a_finished_run_changes_nothing(tmp_path, classification):
    done = make_run(tmp_path, checkpoint_every=4)
    done.fit(classification, epochs=2)
    again = make_run(tmp_path, checkpoint_every=4, seed_model=1)
    again.fit(classification, epochs=2, resume=True)
    assert_same_weights(done, again)
    assert again.step == 14


def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, classification):
    uninterrupted = make_run(tmp_path / "a", checkpoint_every=2)
    uninterrupted.fit(classification, epochs=2)
    crashing = make_run(tmp_path / "b", checkpoint_every=2, callbacks=[CrashAt(9)])
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(classification, epochs=2)
    newest = tmp_path / "b" / "step-000000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged on disk after it was written
    resumed = make_run(tmp_path / "b", checkpoint_every=2)
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable checkpoint .*step-000000008\.pt"):
        resumed.fit(classification, epochs=2, resume=True)
    assert_same_weights(uninterrupted, resumed)


@pytest.mark.parametrize(("option", "saved", "now"), [("batch_size", 16, 20), ("seed", 0, 1), ("shuffle", True, False)])
def test_resume_with_another_setting_raises(tmp_path, classification, option, saved, now):
    make_run(tmp_path, **{option: saved}).fit(classification, epochs=1)
    trainer = make_run(tmp_path, **{option: now})
    with pytest.raises(CheckpointError, match=rf"written with {option}={saved!r}, but this run has {option}={now!r}"):
        trainer.fit(classification, epochs=2, resume=True)


def test_resume_with_another_data_size_raises(tmp_path, classification):
    x, y = classification
    make_run(tmp_path).fit((x, y), epochs=1)
    with pytest.raises(CheckpointError, match=r"num_samples=100, but this run has num_samples=90"):
        make_run(tmp_path).fit((x[:90], y[:90]), epochs=2, resume=True)


def test_resume_with_another_micro_batch_size_is_allowed(tmp_path, classification):
    make_run(tmp_path, optimizer="sgd").fit(classification, epochs=1)
    trainer = make_run(tmp_path, optimizer="sgd", micro_batch_size=5)
    trainer.fit(classification, epochs=2, resume=True)
    assert trainer.step == 14


# ---------------------------------------------------------------------------- on_nan="rollback"
def test_on_nan_rollback_restores_the_last_checkpoint_and_skips_the_batch(tmp_path, classification, caplog):
    x, y = classification
    x = x.copy()
    x[55, 0] = np.nan  # in batch 5 (step 6) of batches of 10
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=10,
                      shuffle=False, on_nan="rollback", checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="batchfit"):
        history = trainer.fit((x, y), epochs=1)
    assert "non-finite loss at step 6 (epoch 1): rolled back to" in caplog.text
    assert "step-000000004.pt" in caplog.text

    # the update of batch 4 (after the checkpoint of step 4) is undone, batch 5 is skipped
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for batch in (0, 1, 2, 3, 6, 7, 8, 9):
        F.cross_entropy(reference(xt[batch * 10 : batch * 10 + 10]), yt[batch * 10 : batch * 10 + 10]).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    assert trainer.skipped_steps == 1 and trainer.step == 8
    assert [r["step"] for r in history.steps] == list(range(1, 9))
    assert all(np.isfinite(history.losses()))


def test_on_nan_rollback_without_a_checkpoint_yet_skips(tmp_path, classification, caplog):
    x, y = classification
    x = x.copy()
    x[5, 0] = np.nan
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=10,
                      shuffle=False, on_nan="rollback", checkpoint_dir=tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="batchfit"):
        trainer.fit((x, y), epochs=1)
    assert "non-finite loss at step 1 (epoch 1): skipped the update" in caplog.text
    assert trainer.step == 9 and trainer.skipped_steps == 1


# ---------------------------------------------------------------------------- signals
def test_signal_handlers_are_restored_after_fit(tmp_path, classification):
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    make_run(tmp_path).fit(classification, epochs=1)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_signal_during_the_end_of_an_epoch_stops_before_the_next_one(tmp_path, classification):
    """SIGTERM arriving in validation or an epoch-end callback saves and exits at the epoch's boundary,
    without training a step of the next epoch."""
    import signal

    class SignalAtEpochEnd(Callback):
        def on_epoch_end(self, trainer, epoch, record):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    run = make_run(tmp_path, callbacks=[SignalAtEpochEnd()])
    with pytest.raises(SystemExit) as stopped:
        run.fit(classification, epochs=3)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert run.batcher.epoch == 1 and run.batcher.samples_done == 0  # at the boundary, nothing of epoch 2
    newest = torch.load(tmp_path / names(tmp_path)[-1], weights_only=True)
    assert newest["step"] == run.step == len(run.history.losses())
    resumed = make_run(tmp_path)
    resumed.fit(classification, epochs=3, resume=True)
    reference = make_run(tmp_path / "reference")
    reference.fit(classification, epochs=3)
    assert_same_weights(resumed, reference)


def test_save_checkpoint_without_a_folder():
    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    with pytest.raises(ValueError, match=r"`checkpoint_dir` must be a folder to save checkpoints in"):
        trainer.save_checkpoint()


def test_checkpoint_folder_has_no_temporary_files_after_fit(tmp_path, classification):
    make_run(tmp_path, checkpoint_every=1, keep_checkpoints=50).fit(classification, epochs=1)
    assert all(name.startswith("step-") and name.endswith(".pt") for name in os.listdir(tmp_path))
    assert len(os.listdir(tmp_path)) == 7


# ---------------------------------------------------------------------------- early stopping across resumes
def early_stopped_run(folder, classification, *callbacks):
    x, y = classification
    flipped = (x, (y + 1) % 3)  # validation gets worse as training goes on: early stopping triggers
    trainer = make_run(folder, optimizer="sgd", checkpoint_every=3,
                       callbacks=[EarlyStopping(monitor="val_loss", patience=1), *callbacks])
    trainer.optimizer.param_groups[0]["lr"] = 0.5
    trainer.base_lrs = [0.5]
    return trainer, flipped


def test_resume_with_early_stopping_is_exact(tmp_path, classification):
    uninterrupted, flipped = early_stopped_run(tmp_path / "a", classification)
    uninterrupted.fit(classification, epochs=30, val=flipped)
    stopped_after = len(uninterrupted.history.epochs)
    assert stopped_after < 30
    crashing, _ = early_stopped_run(tmp_path / "b", classification, CrashAt(7 * stopped_after - 2))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(classification, epochs=30, val=flipped)
    resumed, _ = early_stopped_run(tmp_path / "b", classification)
    resumed.fit(classification, epochs=30, val=flipped, resume=True)
    assert_same_weights(uninterrupted, resumed)
    assert len(resumed.history.epochs) == stopped_after


def test_resume_of_an_early_stopped_run_trains_no_further(tmp_path, classification):
    done, flipped = early_stopped_run(tmp_path, classification)
    done.fit(classification, epochs=30, val=flipped)
    again, _ = early_stopped_run(tmp_path, classification)
    again.fit(classification, epochs=30, val=flipped, resume=True)
    assert again.step == done.step
    assert len(again.history.epochs) == len(done.history.epochs)
    assert_same_weights(done, again)
