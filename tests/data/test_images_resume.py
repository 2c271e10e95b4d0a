"""Invariant 4 for images: a run decoding and augmenting encoded JPEG shards in 2 worker processes,
killed with SIGKILL mid-epoch (twice) and resumed, ends with bit-identical weights.

Each run is this file started as a script in its own process group (the run and its workers are
killed together, as a crash or an out-of-memory kill would).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
pytest.importorskip("PIL.Image")
STEPS_PER_EPOCH, EPOCHS = 6, 2


def train(shards: str, checkpoints: str, out: str, steps_file: str) -> None:
    """One run (resumed from ``checkpoints`` when it holds one); final weights to ``out``."""
    import torch.nn.functional as F

    import batchfit as bf

    class StepLog(bf.Callback):
        def on_fit_begin(self, trainer):
            with open(steps_file, "a") as handle:
                handle.write("start\n")

        def on_step_end(self, trainer, record):
            with open(steps_file, "a") as handle:
                handle.write(f"{record['step']}\n")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
    train_source = bf.images.ImageSource(shards, bf.images.train_transform(16))
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.Adam(model.parameters(), lr=0.01), batch_size=8,
                         shuffle=True, seed=5, workers=2, checkpoint_dir=checkpoints, checkpoint_every=1,
                         progress=False, callbacks=[StepLog()])
    trainer.fit(train_source, epochs=EPOCHS, resume=True)
    torch.save(model.state_dict(), out + ".tmp")
    os.replace(out + ".tmp", out)


def start(shards: Path, folder: Path) -> subprocess.Popen:
    args = [str(shards), str(folder / "checkpoints"), str(folder / "weights.pt"), str(folder / "steps.txt")]
    return subprocess.Popen([sys.executable, __file__, *args], start_new_session=True,
                            stderr=open(folder / "log.txt", "a"))


def steps_done(folder: Path) -> int:
    path = folder / "steps.txt"
    return sum(line.isdigit() for line in path.read_text().split()) if path.exists() else 0


def kill_after(process: subprocess.Popen, folder: Path, steps: int) -> None:
    """SIGKILL the run and its workers once ``steps`` steps are logged (their checkpoints written)."""
    deadline = time.monotonic() + 240
    while steps_done(folder) < steps:
        assert process.poll() is None, (folder / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import batchfit as bf

    root = tmp_path_factory.mktemp("resume")
    folder = bf.images.make_image_folder(root / "images", 16, classes=3, sizes=(30, 70))
    return bf.images.write_image_shards(folder, root / "shards", workers=0, progress=False).path


def test_sigkilled_image_run_with_workers_resumes_bit_identical(shards, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    assert start(shards, reference).wait(timeout=300) == 0, (reference / "log.txt").read_text()[-3000:]
    kill_after(start(shards, killed), killed, 3)  # mid-epoch 1
    kill_after(start(shards, killed), killed, STEPS_PER_EPOCH + 3)  # mid-epoch 2
    assert start(shards, killed).wait(timeout=300) == 0, (killed / "log.txt").read_text()[-3000:]
    expected, got = torch.load(reference / "weights.pt"), torch.load(killed / "weights.pt")
    assert steps_done(reference) == STEPS_PER_EPOCH * EPOCHS
    runs = [[int(step) for step in run.split()] for run in (killed / "steps.txt").read_text().split("start")[1:]]
    assert len(runs) == 3 and runs[1][0] > 1 and runs[2][0] > STEPS_PER_EPOCH, runs  # resumed, not afresh
    assert runs[2][-1] == STEPS_PER_EPOCH * EPOCHS
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


if __name__ == "__main__":
    train(*sys.argv[1:5])
