"""Faults around checkpoints: a second live run, a full disk, a plan measured before the first
checkpoint, and checkpoints that do not fit the run (refused before anything is loaded)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit import Callback, CheckpointError, Trainer
from batchfit.core.durable import process_alive
from batchfit.measure.auto import BatchChoice
from batchfit.train import checkpoint as ckpt
from batchfit.train import plan as plan_module


def make_run(folder, optimizer: str = "adam", hidden: int = 16, seed: int = 0, **options):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(hidden, 3))
    make_optimizer = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    options.setdefault("batch_size", 16)
    options.setdefault("progress", False)
    return Trainer(model, F.cross_entropy, make_optimizer(model.parameters(), lr=0.01), checkpoint_dir=folder,
                   **options)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt(f"crash after step {self.step}")


# ---------------------------------------------------------------------------- one run per folder
def test_second_live_run_on_a_checkpoint_dir_is_refused_naming_the_first(tmp_path, classification):
    refused = []

    class StartAnother(Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 2:
                other = make_run(tmp_path, seed=1)
                with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {os.getpid()}\)"):
                    other.fit(classification, epochs=1)
                refused.append(weights(other))

    first = make_run(tmp_path, checkpoint_every=2, callbacks=[StartAnother()])
    first.fit(classification, epochs=1)
    assert refused, "the second run was tried"
    after = make_run(tmp_path)  # the first run has ended: its lock is gone
    after.fit(classification, epochs=2, resume=True)
    assert after.step == 14


def test_lock_is_released_when_the_owner_dies(tmp_path):
    code = f"import sys, os; sys.path[:0] = {sys.path!r}\n" \
           "from batchfit.train.checkpoint import FolderLock\n" \
           f"FolderLock({str(tmp_path)!r}).acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    lock = ckpt.FolderLock(tmp_path)
    lock.acquire()  # no error: the dead process holds nothing
    lock.release()


def test_lock_dies_with_the_run_not_with_its_forked_workers(tmp_path):
    # A run takes the lock, forks a worker that outlives it (as data-loading workers do for a
    # moment after a SIGKILL), and dies: a restart must get the lock at once.
    code = f"import sys, os, time; sys.path[:0] = {sys.path!r}\n" \
           "from batchfit.train.checkpoint import FolderLock\n" \
           f"FolderLock({str(tmp_path)!r}).acquire()\n" \
           "child = os.fork()\n" \
           "if child == 0:\n    null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)\n" \
           "    time.sleep(60); os._exit(0)\n" \
           "print(child, flush=True); os._exit(0)"
    worker = int(subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True,
                                text=True).stdout)
    try:
        assert process_alive(worker)
        lock = ckpt.FolderLock(tmp_path)
        lock.acquire()  # before the fix: "in use by another run" while the worker lived
        lock.release()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_stale_temporary_file_of_a_live_writer_is_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".step-000000007.pt.{sleeper.pid}.tmp"
        live.write_bytes(b"being written")
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout.strip()
        dead = tmp_path / f".step-000000006.pt.{dead_pid}.tmp"
        dead.write_bytes(b"left by a crash")
        ckpt.save_checkpoint({"w": torch.ones(2)}, tmp_path, 1, keep=3)
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (skipped where this process may not mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_last(small_disk):
    ckpt.save_checkpoint({"w": torch.ones(1000)}, small_disk, 1, keep=3)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*step-000000002\.pt: the disk is full"):
        ckpt.save_checkpoint({"w": torch.ones(1_000_000)}, small_disk, 2, keep=3)
    assert sorted(p.name for p in small_disk.iterdir()) == ["step-000000001.pt"]
    assert torch.equal(ckpt.load_latest(small_disk)[0]["w"], torch.ones(1000))


def test_write_shards_on_a_full_disk_leaves_nothing_and_names_the_path(small_disk):
    from batchfit import ShardError, write_shards

    target = small_disk / "train"
    for _ in range(2):  # a retry meets an empty disk again, not the first try's leftovers
        with pytest.raises(ShardError, match=rf"cannot write shards to {target}: the disk is full"):
            write_shards(target, (np.ones((20_000, 8), np.float32), np.zeros(20_000, np.int64)))
        assert list(small_disk.iterdir()) == []


# ---------------------------------------------------------------------------- a measured plan is durable
def fixed_choice(batch_size: int):
    def choose(*args, **kwargs):
        return BatchChoice(batch_size, 64, 100.0, "stands in for a timing-based measurement")

    return choose


def test_auto_batch_killed_before_the_first_checkpoint_resumes_with_the_same_choice(tmp_path, classification,
                                                                                   monkeypatch):
    monkeypatch.setattr(plan_module, "choose_batch_size", fixed_choice(8))
    uninterrupted = make_run(tmp_path / "a", batch_size="auto", checkpoint_every=50)
    uninterrupted.fit(classification, epochs=2)
    crashing = make_run(tmp_path / "b", batch_size="auto", checkpoint_every=50, callbacks=[CrashAt(3)])
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(classification, epochs=2)
    assert ckpt.list_checkpoints(tmp_path / "b")[0].name == "step-000000000.pt"
    # A restart would measure differently (timings vary); it must not measure at all.
    monkeypatch.setattr(plan_module, "choose_batch_size", fixed_choice(32))
    resumed = make_run(tmp_path / "b", batch_size="auto", checkpoint_every=50, seed=1)
    resumed.fit(classification, epochs=2, resume=True)
    assert resumed.batcher.batch_size == 8
    assert_same(weights(resumed), weights(uninterrupted))
    assert resumed.history.losses() == uninterrupted.history.losses()


# ---------------------------------------------------------------------------- checkpoints that do not fit
def test_resume_into_another_optimizer_is_refused_before_loading(tmp_path, classification):
    make_run(tmp_path, optimizer="sgd").fit(classification, epochs=1)
    other = make_run(tmp_path, optimizer="adam", seed=3)
    before = weights(other)
    with pytest.raises(CheckpointError, match=r"written with optimizer='SGD', but this run has optimizer='Adam'"):
        other.fit(classification, epochs=2, resume=True)
    assert_same(weights(other), before)
    assert other.optimizer.state == {}


def test_resume_into_another_model_shape_is_refused_in_one_line(tmp_path, classification):
    make_run(tmp_path).fit(classification, epochs=1)
    other = make_run(tmp_path, hidden=32, seed=3)
    before = weights(other)
    with pytest.raises(CheckpointError, match=r"holds weights of another model: 0\.weight has shape \(16, 5\) "
                                              r"there, \(32, 5\) here"):
        other.fit(classification, epochs=2, resume=True)
    assert_same(weights(other), before)


def test_resume_with_other_parameter_groups_is_refused(tmp_path, classification):
    make_run(tmp_path).fit(classification, epochs=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 3))
    groups = [{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 0.001}]
    other = Trainer(model, F.cross_entropy, torch.optim.Adam(groups, lr=0.01), batch_size=16, progress=False,
                    checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"parameter groups of \[4\] tensors; this optimizer has \[2, 2\]"):
        other.fit(classification, epochs=2, resume=True)


def test_resume_on_other_data_of_the_same_size_is_refused_unless_forced(tmp_path, classification):
    x, y = classification
    make_run(tmp_path).fit((x, y), epochs=1)
    with pytest.raises(CheckpointError, match=r"written with data_fingerprint='[0-9a-f]+', but this run has"):
        make_run(tmp_path).fit((x + 1, y), epochs=2, resume=True)
    forced = make_run(tmp_path)
    forced.fit((x + 1, y), epochs=2, resume="force")
    assert forced.step == 14


def test_resume_refuses_a_bad_resume_value(tmp_path, classification):
    with pytest.raises(ValueError, match=r"`resume` must be False, True or 'force'. Received: resume='yes'"):
        make_run(tmp_path).fit(classification, epochs=1, resume="yes")
