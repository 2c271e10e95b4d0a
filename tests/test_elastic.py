"""``batchfit train --nproc 2 --max-restarts 1``: a rank killed mid-run, the group restarted by torchrun's
elastic agent from the newest checkpoint, and the run ending with the weights of one never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

CONFIG = """[data]
train = "train.npz"

[model]
name = "mlp"

[train]
epochs = {epochs}
batch_size = 32
progress = false
device = "cpu"
checkpoint_dir = "{checkpoints}"
checkpoint_every = 10
"""


def _setup(folder: Path, epochs: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    folder.mkdir()
    np.savez(folder / "train.npz", x=x, y=y)
    config = folder / "run.toml"
    config.write_text(CONFIG.format(epochs=epochs, checkpoints=folder / "checkpoints"))
    return config


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchfit", "train", str(config), "--nproc", "2",
            "--out", str(config.parent / "runs"), *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    saved = sorted((folder / "runs").glob("*/model.pt"), key=lambda p: p.stat().st_mtime)[-1]
    return torch.load(saved, weights_only=True)["model"]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_max_restarts_must_not_be_negative(tmp_path):
    done = subprocess.run([sys.executable, "-m", "batchfit", "train", "x.toml", "--max-restarts", "-1"],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 2 and "--max-restarts" in done.stderr and "non-negative" in done.stderr


def test_a_killed_rank_restarts_the_group_from_the_newest_checkpoint(tmp_path):
    epochs = 12  # 16 steps an epoch: 192 steps, a checkpoint every 10
    whole = _setup(tmp_path / "whole", epochs)
    done = subprocess.run(_command(whole), capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = _setup(tmp_path / "killed", epochs)
    launcher = subprocess.Popen(_command(killed, "--max-restarts", "1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
    checkpoints = killed.parent / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*.pt")):  # the run is under way: a checkpoint was written
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "batchfit" in " ".join(p.cmdline())
             and "torch.distributed.run" not in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.kill(ranks[-1].pid, signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert "restart 1 after a failure: resuming from the newest checkpoint" in err
    expected, got = _weights(whole.parent), _weights(killed.parent)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
