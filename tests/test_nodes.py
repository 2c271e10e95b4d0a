"""Two "machines" on one host: two ``batchfit train --nnodes`` agents meeting at a c10d rendezvous on 127.0.0.1.

1. ``--nnodes 2``, one process each: the run ends on the weights of one process (to 1e-5, as DDP does).
2. ``--nnodes 1:2 --max-restarts 1``: one machine (its agent and its worker) is killed with SIGKILL
   mid-run; the other re-rendezvouses alone (world size 1), resumes from the newest checkpoint and
   finishes. The data order changes with the world size, so the reference is the same history
   taken on purpose: 2 ranks up to that checkpoint's step (the checkpoint of run 1, which keeps
   them all), then one process from it. The weights must be bit-identical.

Each agent imports torch twice (the command, then torchrun) and its worker once more: on a loaded
2-core machine a launch takes 10-20 s before the first step, and the shrunk group waits
``last_call_timeout`` (10 s here) for a second machine before it goes on alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import batchfit
from batchfit.cli import main

pytestmark = pytest.mark.slow

CONFIG = """[data]
train = "{data}"

[model]
name = "mlp"

[train]
epochs = 30
batch_size = 32
progress = false
device = "cpu"
checkpoint_dir = "{checkpoints}"
checkpoint_every = 10
keep_checkpoints = 1000
resume = {resume}
"""
STEPS = 30 * 8  # 256 samples in batches of 32
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(batchfit.__file__)))
TIMEOUT = 300


def _data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=x, y=y)
    return folder / "train.npz"


def _config(folder: Path, data: Path, resume: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.toml"
    config.write_text(CONFIG.format(data=data, checkpoints=folder / "checkpoints", resume=str(resume).lower()))
    return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node(config: Path, nnodes: str, port: int, *extra: str) -> list[str]:
    """The command one "machine" runs: one local process, the rendezvous on 127.0.0.1."""
    return [sys.executable, "-m", "batchfit", "train", str(config), "--nproc", "1", "--nnodes", nnodes,
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}", "--out",
            str(config.parent / "runs"), *extra]


def _final(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The summary and weights of the run folder rank 0 wrote last."""
    run = sorted((folder / "runs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    summary = json.loads((run / "summary.json").read_text())
    return summary, torch.load(run / "model.pt", weights_only=True)["model"]


def _one_process(config: Path) -> dict[str, torch.Tensor]:
    assert main(["train", str(config), "--out", str(config.parent / "runs"), "--threads", "1"]) == 0
    return _final(config.parent)[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Two agents, ``--nnodes 2``, one process each; every checkpoint kept."""
    folder = tmp_path_factory.mktemp("two-nodes")
    config = _config(folder / "run", _data(folder))
    port = _free_port()
    agents = [subprocess.Popen(_node(config, "2", port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV) for _ in range(2)]
    outputs = [agent.communicate(timeout=TIMEOUT) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    return config


def test_two_nodes_on_one_host_train_as_one_process(two_nodes):
    summary, weights = _final(two_nodes.parent)
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    alone = _one_process(_config(two_nodes.parent.parent / "alone", two_nodes.parent.parent / "train.npz"))
    assert weights.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(weights[name], alone[name], rtol=0, atol=1e-5, msg=name)


def test_a_killed_node_leaves_the_other_to_finish_alone_from_the_newest_checkpoint(two_nodes, tmp_path):
    data = two_nodes.parent.parent / "train.npz"
    config = _config(tmp_path / "run", data)
    port = _free_port()
    # The first agent holds the rendezvous (its store): the machine that dies is the other one.
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in range(2)]
    agents = [subprocess.Popen(_node(config, "1:2", port, "--max-restarts", "1", "--rdzv-conf",
                                     f"is_host={int(i == 0)},last_call_timeout=10"),
                               stdout=subprocess.PIPE, stderr=logs[i], text=True, env=ENV) for i in range(2)]
    checkpoints = config.parent / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    while not list(checkpoints.glob("step-*.pt")):  # under way on both machines: a checkpoint was written
        assert all(a.poll() is None for a in agents) and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    dying = [agents[1].pid] + [p.pid for p in psutil.Process(agents[1].pid).children(recursive=True)]
    assert len(dying) == 3  # batchfit, torchrun's agent, the worker
    for pid in reversed(dying):
        os.kill(pid, signal.SIGKILL)
    assert agents[1].wait(timeout=30) == -signal.SIGKILL
    out, _ = agents[0].communicate(timeout=TIMEOUT)
    logs[0].seek(0)
    err = logs[0].read()
    for log in logs:
        log.close()
    assert agents[0].returncode == 0, err[-3000:]
    assert "restart 1 after a failure: resuming from the newest checkpoint" in err
    resumed = re.search(r"Resumed from \S+ at step (\d+)", err)
    assert resumed, err[-3000:]
    step = int(resumed.group(1))
    assert 0 < step < STEPS
    summary, weights = _final(config.parent)
    assert summary["world_size"] == 1 and summary["steps"] == STEPS

    # The reference: 2 ranks up to ``step`` (the uninterrupted two-node run's checkpoint), then one process.
    reference = _config(tmp_path / "reference", data, resume=True)
    name = f"step-{step:09d}.pt"
    (reference.parent / "checkpoints").mkdir()
    shutil.copy(two_nodes.parent / "checkpoints" / name, reference.parent / "checkpoints" / name)
    expected = _one_process(reference)
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
