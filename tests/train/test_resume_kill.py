"""Invariant 4, for real: runs killed at random moments resume to bit-identical weights.

The runs are separate processes (forked from ``_resume_worker.py``, started with
``sys.executable``); the test kills them with SIGKILL or SIGTERM and resumes until they finish.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_resume_worker.py")


class Runs:
    """Talks to the worker process that forks the training runs."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self.log = open(log, "w")
        self.process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        assert self.receive() == {"ready": True}, self.log_text()

    def send(self, message: dict) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the worker died:\n{self.log_text()}"
        return json.loads(line)

    def start(self, folder: Path, out: Path, checkpoint_every: int = 1, slow_writes: float = 0.0,
              steps_file: Path | None = None, sigterm_at: int | None = None) -> int:
        self.send({"op": "start", "folder": str(folder), "out": str(out), "checkpoint_every": checkpoint_every,
                   "slow_writes": slow_writes, "steps_file": None if steps_file is None else str(steps_file),
                   "sigterm_at": sigterm_at})
        return self.receive()["pid"]

    def wait(self, pid: int) -> int:
        self.send({"op": "wait", "pid": pid, "timeout": 60})
        status = self.receive()["status"]
        assert status != -999, f"run {pid} hung:\n{self.log_text()}"
        return status

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]

    def close(self) -> None:
        # Every run has been waited for; the worker itself holds nothing worth a slow shutdown.
        self.process.kill()
        self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = Runs(tmp_path_factory.mktemp("worker") / "worker.log")
    yield runs
    runs.close()


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """The final weights of a run that was never interrupted, and how long it took."""
    folder = tmp_path_factory.mktemp("reference")
    started = time.monotonic()
    status = runs.wait(runs.start(folder / "checkpoints", folder / "out.pt"))
    seconds = time.monotonic() - started
    assert status == 0, runs.log_text()
    return torch.load(folder / "out.pt", weights_only=True), seconds


def assert_bit_identical(out: Path, reference: dict) -> None:
    final = torch.load(out, weights_only=True)
    assert final["step"] == reference["step"]
    for name, value in reference["weights"].items():
        assert torch.equal(final["weights"][name], value), name


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def temporary_files(folder: Path) -> list[str]:
    return [p.name for p in folder.glob(".*.tmp")] if folder.is_dir() else []


def lines(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


@pytest.mark.parametrize("trial", range(4))
def test_resume_after_sigkill_at_random_moments_is_bit_identical(runs, reference, tmp_path, trial):
    """Each run is killed after a random number of its steps (0 included) plus a random fraction of a step."""
    expected, _ = reference
    rng = random.Random(1000 + trial)
    folder, out = tmp_path / "checkpoints", tmp_path / "out.pt"
    for attempt in range(4):
        steps = tmp_path / f"steps-{attempt}.txt"
        pid = runs.start(folder, out, steps_file=steps)
        if attempt < 3:
            target = rng.randint(0, 6)  # a run has 24 steps: the first attempt is always killed mid-run
            wait_for(lambda steps=steps, target=target: lines(steps) >= target or out.exists())
            time.sleep(rng.uniform(0.0, 0.004))  # a step with its checkpoint takes a few milliseconds
            os.kill(pid, signal.SIGKILL)
        status = runs.wait(pid)
        if status == 0:
            break
        assert status == -signal.SIGKILL, runs.log_text()
        assert attempt < 3
    assert status == 0, runs.log_text()
    assert_bit_identical(out, expected)
    assert temporary_files(folder) == []


@pytest.mark.parametrize("trial", range(2))
def test_resume_after_sigkill_inside_checkpoint_writes_is_bit_identical(runs, reference, tmp_path, trial):
    """Slow checkpoint writes (a sleep before each fsync), killed while a temporary file exists."""
    expected, _ = reference
    rng = random.Random(2000 + trial)
    folder, out = tmp_path / "checkpoints", tmp_path / "out.pt"
    for _ in range(3):
        pid = runs.start(folder, out, slow_writes=0.02)
        # let a few checkpoints complete first, then kill during the next write
        wait_for(lambda: len(list(folder.glob("step-*.pt"))) >= 1)
        time.sleep(rng.uniform(0.0, 0.2))
        wait_for(lambda: temporary_files(folder) != [])
        os.kill(pid, signal.SIGKILL)
        assert runs.wait(pid) == -signal.SIGKILL
        assert temporary_files(folder) != []  # the half-written file is still there
    assert runs.wait(runs.start(folder, out)) == 0, runs.log_text()
    assert_bit_identical(out, expected)
    assert temporary_files(folder) == []  # a stale temporary file is cleaned up by the next save


@pytest.mark.parametrize("trial", range(2))
def test_resume_after_sigterm_is_bit_identical(runs, reference, tmp_path, trial):
    """SIGTERM: the run finishes its step, saves a checkpoint of it and exits with 128 + 15."""
    expected, seconds = reference
    rng = random.Random(3000 + trial)
    folder, out = tmp_path / "checkpoints", tmp_path / "out.pt"
    for attempt in range(2):
        steps = tmp_path / f"steps-{attempt}.txt"
        pid = runs.start(folder, out, checkpoint_every=5, steps_file=steps)
        # Inside fit (the handler is installed) once a step is logged. A run resumed from the
        # checkpoint of the last step (the previous attempt was signalled during it) logs none:
        # it only ends the epoch and writes ``out``, and a SIGTERM after that is ignored.
        wait_for(lambda steps=steps: steps.exists() or out.exists())
        time.sleep(rng.uniform(0.0, seconds / 3))
        os.kill(pid, signal.SIGTERM)
        status = runs.wait(pid)
        if status == 0:
            break  # the signal came after the last step
        assert status == 143, runs.log_text()
        assert not out.exists()
        last_step = int(steps.read_text().split()[-1])
        newest = sorted(folder.glob("step-*.pt"))[-1]
        assert torch.load(newest, weights_only=True)["step"] == last_step  # saved on the way out
    assert runs.wait(runs.start(folder, out, checkpoint_every=5)) == 0, runs.log_text()
    assert_bit_identical(out, expected)


@pytest.mark.parametrize("step", [5, 8, 24])  # a checkpoint step, an epoch's last step, the run's last step
def test_resume_after_sigterm_during_a_given_step_is_bit_identical(runs, reference, tmp_path, step):
    """The run SIGTERMs itself during ``step``: it saves that step and exits with 143; the resume
    trains only the steps left (none after the last one) and ends bit-identical."""
    expected, _ = reference
    folder, out = tmp_path / "checkpoints", tmp_path / "out.pt"
    stopped, resumed = tmp_path / "steps-0.txt", tmp_path / "steps-1.txt"
    pid = runs.start(folder, out, checkpoint_every=5, steps_file=stopped, sigterm_at=step)
    assert runs.wait(pid) == 143, runs.log_text()
    assert not out.exists()
    assert stopped.read_text().split()[-1] == str(step)
    assert torch.load(sorted(folder.glob("step-*.pt"))[-1], weights_only=True)["step"] == step
    assert runs.wait(runs.start(folder, out, checkpoint_every=5, steps_file=resumed)) == 0, runs.log_text()
    assert lines(resumed) == expected["step"] - step
    assert_bit_identical(out, expected)
