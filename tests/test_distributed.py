"""Data-parallel training on 2 CPU processes (gloo): what one process does, split over ranks.

1. Batch means batch: the weights after an epoch equal those of one process, for a global batch
   of 64 as 2 x 32 and as 2 x (2 x 16) micro-batches.
2. Every sample once per epoch, across the ranks; validation metrics and the noise scale are
   the same on every rank, and the noise scale compares each rank's own first micro-batch
   gradient with the whole batch's.
3. A checkpoint written by 2 ranks resumes on 1 and on 2 processes to the same weights.
4. A stop request or a signal on one rank stops every rank at the same step.
5. An exception on one rank, or a rank killed by SIGKILL, makes the others stop at once with a
   DistributedError instead of waiting for the process-group timeout; a rank that stops
   answering fails the others at BATCHFIT_DIST_TIMEOUT.
6. ``batchfit train CONFIG --nproc 2`` end to end.

Ranks are forked from a multiprocessing forkserver that has already imported torch and
batchfit, so that a rank starts in milliseconds rather than seconds. A rank runs one of the
``scenario_*`` functions below with the environment torchrun would give it, and hands back
what it measured (or the error it raised) through a file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit import ArraySource, Batcher, Callback, Trainer
from batchfit.measure.noise import grad_sq_estimate, simple_noise_scale, trace_cov_estimate

pytestmark = pytest.mark.slow

RANK_TIMEOUT = 60.0  # a hang fails the test instead of blocking it
WORLD = 2


# ---------------------------------------------------------------- what each rank runs


class IdNet(torch.nn.Module):
    """A small MLP that remembers which samples it trained on (their ids ride along as an input)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.register_buffer("scale", torch.ones(3))  # DDP broadcasts buffers: evaluate must not
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(ids.clone())
        return self.body(x) * self.scale


def data(num_samples: int = 203, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, sample ids and labels (203 samples: the last batch of 64 splits 6 + 5)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5).astype(np.int64)
    return x, np.arange(num_samples), y


def make_trainer(micro_batch_size: int | None = None, callbacks: tuple[Callback, ...] = (),
                 **options: Any) -> tuple[Trainer, IdNet]:
    model = IdNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(model, F.cross_entropy, optimizer, batch_size=64, micro_batch_size=micro_batch_size,
                      device="cpu", progress=False, seed=3, callbacks=list(callbacks), **options)
    return trainer, model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EpochIds(Callback):
    """The ids each epoch trained on, in order."""

    def __init__(self, model: IdNet) -> None:
        self.model, self.epochs = model, []

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict) -> None:
        self.epochs.append(torch.cat(self.model.seen).tolist())
        self.model.seen.clear()


class AtStep(Callback):
    """Does ``action`` after step ``step``, on rank ``rank`` only."""

    def __init__(self, step: int, rank: int, action: str) -> None:
        self.step, self.rank, self.action = step, rank, action

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if record["step"] != self.step or trainer.dist.rank != self.rank:
            return
        if self.action == "stop":
            trainer.stop_training = True
        elif self.action == "raise":
            raise ValueError(f"rank {self.rank} cannot go on")
        else:
            os.kill(os.getpid(), getattr(signal, self.action))
            time.sleep(0.2)  # SIGKILL ends the process here; SIGTERM has been noted by the trainer


def scenario_equivalence(rank: int) -> dict[str, Any]:
    """One epoch for each split of the batch, plus a run that measures the noise scale."""
    x, ids, y = data()
    val = data(37, seed=1)
    out: dict[str, Any] = {}
    for name, micro in (("2x32", None), ("2x(2x16)", 16)):
        trainer, model = make_trainer(micro)
        recorder = EpochIds(model)
        trainer.callbacks.append(recorder)
        collectives: list[int] = []  # the agreement's all-reduces of its own (not riding with the gradients)
        own = trainer.dist.start_all_reduce_sum
        trainer.dist.start_all_reduce_sum = lambda t, calls=collectives, own=own: (calls.append(t.numel()), own(t))[1]  # type: ignore
        history = trainer.fit((x, ids, y), epochs=2, val=val)
        out[name] = {"weights": weights(model), "ids": recorder.epochs, "epochs": history.epochs,
                     "steps": trainer.step, "collectives": collectives,
                     "losses": [record["loss"] for record in history.steps]}
    trainer, model = make_trainer(16, noise_scale=True)
    history = trainer.fit((x, ids, y), epochs=1)
    out["noise"] = [record["noise_scale"] for record in history.steps]
    if rank == 0:  # alone: evaluate and predict must not wait for the other rank
        out["evaluate"] = trainer.evaluate(val)
        out["predict"] = trainer.predict(val)
    return out


def scenario_train(rank: int, folder: str | None = None, epochs: int = 2, resume: bool = False,
                   at_step: tuple[int, int, str] | None = None) -> dict[str, Any]:
    """A run with checkpoints in ``folder``; ``at_step``: (step, rank, action) of :class:`AtStep`."""
    x, ids, y = data()
    callbacks = (AtStep(*at_step),) if at_step else ()
    options: dict[str, Any] = {"checkpoint_dir": folder, "checkpoint_every": 1} if folder else {}
    trainer, model = make_trainer(16, callbacks, **options)
    try:
        trainer.fit((x, ids, y), epochs=epochs, resume=resume)
    except SystemExit as stop:  # the trainer's answer to a signal
        return {"exit": stop.code, "steps": trainer.step, "weights": weights(model)}
    return {"steps": trainer.step, "weights": weights(model)}


def run_rank(rank: int, port: int, scenario: str, kwargs: dict[str, Any], result: str, env: dict[str, str]) -> None:
    """A rank's process: the environment torchrun would set, one scenario, its outcome in ``result``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), **env)
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        outcome = {"result": globals()[f"scenario_{scenario}"](rank, **kwargs)}
    except BaseException as error:
        outcome = {"error": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    outcome["seconds"] = time.monotonic() - start
    torch.save(outcome, result + ".tmp")
    os.replace(result + ".tmp", result)
    os._exit(0)


# ---------------------------------------------------------------- launching ranks


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing context whose processes fork from one that has imported what a rank needs."""
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo is what the first optimizer imports: seconds that every rank would spend again.
    context.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "batchfit", __name__])
    warm_up = context.Process(target=time.sleep, args=(0,))  # starts the server, so that no test times it
    warm_up.start()
    warm_up.join(RANK_TIMEOUT * 2)
    return context


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(forkserver, tmp_path: Path, scenario: str, env: dict[str, str] | None = None,
           timeout: float = RANK_TIMEOUT, frozen: int | None = None,
           **kwargs: Any) -> tuple[list[dict[str, Any]], float]:
    """Run ``scenario`` on 2 ranks; returns each rank's outcome and the wall time until all ended.

    Rank ``frozen`` is expected to stop answering: it is killed once the other has ended.
    """
    port, start = free_port(), time.monotonic()
    results = [str(tmp_path / f"{scenario}-{time.monotonic_ns()}-rank{rank}.pt") for rank in range(WORLD)]
    ranks = [forkserver.Process(target=run_rank, args=(rank, port, scenario, kwargs, results[rank], env or {}))
             for rank in range(WORLD)]
    for process in ranks:
        process.start()
    for rank, process in enumerate(ranks):
        if rank != frozen:
            process.join(max(0.1, start + timeout - time.monotonic()))
    seconds = time.monotonic() - start
    hung = [rank for rank, process in enumerate(ranks) if process.is_alive() and rank != frozen]
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} of {scenario!r} still ran after {timeout} s"
    return [torch.load(path, weights_only=False) if os.path.exists(path) else {"exitcode": process.exitcode}
            for path, process in zip(results, ranks)], seconds


def result_of(outcome: dict[str, Any]) -> Any:
    assert "result" in outcome, outcome.get("traceback", outcome)
    return outcome["result"]


def single_process(micro_batch_size: int | None, epochs: int = 2, **options: Any) -> tuple[Trainer, IdNet]:
    x, ids, y = data()
    trainer, model = make_trainer(micro_batch_size, **options)
    trainer.fit((x, ids, y), epochs=epochs, val=data(37, seed=1))
    return trainer, model


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def equivalence(forkserver, tmp_path_factory):
    outcomes, _ = launch(forkserver, tmp_path_factory.mktemp("equivalence"), "equivalence")
    return [result_of(outcome) for outcome in outcomes]


@pytest.mark.parametrize("split", ["2x32", "2x(2x16)"])
def test_ddp_weights_equal_single_process(equivalence, split):
    _, expected = single_process(None)
    for rank_result in equivalence:
        assert rank_result[split]["steps"] == 8  # 2 epochs of ceil(203 / 64) steps
        assert_same_weights(rank_result[split]["weights"], weights(expected))
    assert all(torch.equal(a, b) for a, b in zip(equivalence[0][split]["weights"].values(),
                                                 equivalence[1][split]["weights"].values()))


@pytest.mark.parametrize("split", ["2x32", "2x(2x16)"])
def test_ddp_step_agreement_rides_in_the_gradient_all_reduce(equivalence, split):
    """The per-step loss, stop and signal agreement costs no collective of its own under DDP (it rides in the
    last gradient bucket), and the losses it sums are one process's."""
    single, _ = single_process(None)
    expected = [record["loss"] for record in single.history.steps]
    for rank_result in equivalence:
        assert rank_result[split]["collectives"] == [6, 6]  # the stop checks before each epoch; none of the 8 steps
        assert rank_result[split]["losses"] == pytest.approx(expected, rel=1e-6)
    assert equivalence[0][split]["losses"] == equivalence[1][split]["losses"]


@pytest.mark.parametrize("split", ["2x32", "2x(2x16)"])
def test_ddp_every_sample_once_per_epoch(equivalence, split):
    for epoch in range(2):
        seen = [rank_result[split]["ids"][epoch] for rank_result in equivalence]
        assert sorted(seen[0] + seen[1]) == list(range(203))
        assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_ddp_validation_metrics_are_the_same_on_every_rank(equivalence):
    trainer, _ = single_process(None)
    ranks = [[{k: v for k, v in record.items() if k != "seconds"} for record in rank_result["2x32"]["epochs"]]
             for rank_result in equivalence]
    assert ranks[0] == ranks[1]
    for record, expected in zip(ranks[0], trainer.history.epochs):
        for key in ("val_loss", "val_accuracy", "loss"):
            assert record[key] == pytest.approx(expected[key], rel=1e-5)


def test_ddp_noise_scale_is_the_same_on_every_rank(equivalence):
    noise = [rank_result["noise"] for rank_result in equivalence]
    assert noise[0] == noise[1]
    assert np.isfinite(noise[0][-1])


def test_ddp_noise_scale_compares_each_ranks_first_micro_batch_with_the_whole_batch(equivalence):
    """Step 1: |G_16|² of each rank's own first micro-batch (before the all-reduce), averaged, against |G_64|²."""
    source = ArraySource(*data())

    def squared_norm(batch: tuple[torch.Tensor, ...]) -> float:
        model = IdNet()
        loss = F.cross_entropy(model(*batch[:-1]), batch[-1])
        return sum(float(g.double().pow(2).sum()) for g in torch.autograd.grad(loss, list(model.parameters())))

    whole = next(iter(Batcher(source, 64, seed=3)))
    firsts = [tuple(t[:16] for t in next(iter(Batcher(source, 64, seed=3, rank=r, world_size=WORLD))))
              for r in range(WORLD)]
    small, big = sum(map(squared_norm, firsts)) / WORLD, squared_norm(whole)
    expected = simple_noise_scale(grad_sq_estimate(small, big, 16, 64), trace_cov_estimate(small, big, 16, 64))
    assert equivalence[0]["noise"][0] == pytest.approx(expected, rel=1e-4)


def test_ddp_evaluate_and_predict_on_one_rank_alone(equivalence):
    trainer, _ = single_process(16, epochs=1)
    val = data(37, seed=1)
    assert equivalence[0]["evaluate"] == pytest.approx(trainer.evaluate(val), rel=1e-5)
    torch.testing.assert_close(equivalence[0]["predict"], trainer.predict(val), rtol=1e-5, atol=1e-6)


def test_ddp_stop_on_one_rank_stops_every_rank_at_the_same_step(forkserver, tmp_path):
    outcomes, _ = launch(forkserver, tmp_path, "train", at_step=(5, 1, "stop"))
    results = [result_of(outcome) for outcome in outcomes]
    assert [result["steps"] for result in results] == [5, 5]
    # Where one process stopped by the same request would be.
    x, ids, y = data()
    trainer, model = make_trainer(16, (AtStep(5, 0, "stop"),))
    trainer.fit((x, ids, y), epochs=2)
    assert trainer.step == 5
    assert_same_weights(results[1]["weights"], weights(model))


def test_ddp_checkpoint_resumes_on_one_and_on_two_processes(forkserver, tmp_path):
    folder = tmp_path / "two"
    outcomes, _ = launch(forkserver, tmp_path, "train", folder=str(folder), at_step=(5, 0, "stop"))
    assert [result_of(outcome)["steps"] for outcome in outcomes] == [5, 5]
    shutil.copytree(folder, tmp_path / "one")
    outcomes, _ = launch(forkserver, tmp_path, "train", folder=str(folder), resume=True)
    on_two = [result_of(outcome) for outcome in outcomes]
    x, ids, y = data()
    trainer, model = make_trainer(16, checkpoint_dir=tmp_path / "one", checkpoint_every=1)
    trainer.fit((x, ids, y), epochs=2, resume=True)
    _, uninterrupted = single_process(16, epochs=2)
    assert trainer.step == on_two[0]["steps"] == on_two[1]["steps"] == 8
    assert_same_weights(weights(model), on_two[0]["weights"])
    assert_same_weights(weights(model), weights(uninterrupted))


def test_ddp_signal_on_one_rank_checkpoints_and_stops_every_rank(forkserver, tmp_path):
    folder = tmp_path / "checkpoints"
    outcomes, _ = launch(forkserver, tmp_path, "train", folder=str(folder), at_step=(3, 1, "SIGTERM"))
    results = [result_of(outcome) for outcome in outcomes]
    assert [result.get("exit") for result in results] == [128 + signal.SIGTERM] * 2
    assert results[0]["steps"] == results[1]["steps"] in (3, 4)  # the step under way when it was noted
    assert (folder / f"step-{results[0]['steps']:09d}.pt").exists()
    outcomes, _ = launch(forkserver, tmp_path, "train", folder=str(folder), resume=True)
    _, uninterrupted = single_process(16, epochs=2)
    assert_same_weights(result_of(outcomes[0])["weights"], weights(uninterrupted))


def test_ddp_exception_on_one_rank_fails_every_rank_fast(forkserver, tmp_path):
    outcomes, seconds = launch(forkserver, tmp_path, "train", env={"BATCHFIT_DIST_TIMEOUT": "300"},
                               at_step=(3, 1, "raise"))
    assert outcomes[1]["error"] == "ValueError" and "rank 1 cannot go on" in outcomes[1]["message"]
    assert outcomes[0]["error"] == "DistributedError"
    assert "rank 1 failed: ValueError: rank 1 cannot go on" in outcomes[0]["message"]
    assert seconds < 30  # not the 300 s timeout


def test_ddp_killed_rank_does_not_leave_the_other_hanging(forkserver, tmp_path):
    outcomes, seconds = launch(forkserver, tmp_path, "train", env={"BATCHFIT_DIST_TIMEOUT": "20"},
                               at_step=(3, 1, "SIGKILL"))
    assert outcomes[1] == {"exitcode": -signal.SIGKILL}
    assert outcomes[0]["error"] == "DistributedError", outcomes[0].get("traceback")
    assert outcomes[0]["message"].startswith("rank 0: ")
    assert seconds < 30


def test_ddp_rank_that_stops_answering_fails_the_other_at_the_timeout(forkserver, tmp_path):
    outcomes, seconds = launch(forkserver, tmp_path, "train", env={"BATCHFIT_DIST_TIMEOUT": "3"}, frozen=1,
                               at_step=(3, 1, "SIGSTOP"))
    assert outcomes[0]["error"] == "DistributedError", outcomes[0].get("traceback")
    assert "stopped responding" in outcomes[0]["message"]
    assert 3 <= seconds < 30


def test_dist_timeout_env_is_checked(monkeypatch):
    from batchfit.distributed import timeout_from_env

    monkeypatch.setenv("BATCHFIT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="BATCHFIT_DIST_TIMEOUT"):
        timeout_from_env()
    monkeypatch.setenv("BATCHFIT_DIST_TIMEOUT", "12.5")
    assert timeout_from_env() == 12.5


def test_cli_train_nproc_2(tmp_path):
    x, _, y = data()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    config = tmp_path / "run.toml"
    config.write_text('[data]\ntrain = "train.npz"\nval_split = 0.2\n\n[model]\nname = "mlp"\n\n'
                      '[train]\nepochs = 2\nbatch_size = 32\nprogress = false\ndevice = "cpu"\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "batchfit", "train", str(config), "--nproc", "2",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["steps"] >= 2 * 5  # 2 epochs of >= 162 / 32 steps
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1  # rank 0 alone writes the run folder
    assert (run_dirs[0] / "metrics.csv").exists()
