"""A stream that runs for weeks: restarts with nothing new to read, a default checkpoint interval in seconds,
and a history whose memory and checkpoints stay flat (older rows go to metrics.csv)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.config import load_config
from batchfit.run import run_config

TOML = """
[stream]
redis = "{url}"
stream = "ratings"
fields = ["user", "item", "rating"]
idle_timeout = 0.3

[model]
name = "batchfit.workloads.stream:MatrixFactorization"
args = {{ users = 5, items = 6 }}

[optimizer]
name = "adam"
lr = 0.01

[loss]
name = "mse"

[train]
batch_size = 8
checkpoint_dir = "{folder}/ckpt"
resume = true
out = "{folder}/runs"
progress = false
"""


def _events(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 3)).astype(np.float32)
    return [(x[i], x[i, :1] * 2.0) for i in range(count)]


def _trainer(tmp_path, **options) -> bf.Trainer:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    options.setdefault("checkpoint_dir", tmp_path / "ckpt")
    return bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                      progress=False, **options)


def test_restart_with_nothing_new_to_read_resumes_and_trains_nothing(tmp_path):
    events = _events(8)
    first = _trainer(tmp_path)
    first.fit(bf.StreamSource(events), resume=True)
    again = _trainer(tmp_path)
    history = again.fit(bf.StreamSource(events), resume=True)  # every event used already: nothing to read
    assert again.step == first.step == 2 and again.samples_seen == 8
    assert math.isnan(history.epochs[-1]["loss"]) and history.epochs[-1]["steps"] == 2
    assert history.epochs[-1]["preq_loss"] == pytest.approx(first.history.epochs[-1]["preq_loss"])
    torch.testing.assert_close(again.module.state_dict(), first.module.state_dict())


def test_toml_rerun_with_resume_true_and_nothing_new_in_the_stream(redis_server, tmp_path):
    import redis

    client = redis.Redis.from_url(redis_server)
    rng = np.random.default_rng(0)
    for _ in range(40):
        client.xadd("ratings", {"user": int(rng.integers(5)), "item": int(rng.integers(6)),
                                "rating": float(rng.integers(1, 6))})
    path = tmp_path / "run.toml"
    path.write_text(TOML.format(url=redis_server, folder=tmp_path))
    first = run_config(load_config(path))
    second = run_config(load_config(path))  # nothing new: resumes, ends at once
    assert first is not None and second is not None
    assert first["steps"] == second["steps"] == 5 and second["samples"] == 40
    assert int(client.xpending("ratings", "batchfit")["pending"]) == 0
    client.close()


def test_checkpoint_dir_without_an_interval_checkpoints_every_few_seconds(redis_server, tmp_path, monkeypatch):
    import redis

    import batchfit.train.trainer as trainer_module

    client = redis.Redis.from_url(redis_server)
    for x in _events(24):
        client.xadd("events", {"a": repr(float(x[0][0])), "b": repr(float(x[0][1])), "c": repr(float(x[0][2])),
                               "y": repr(float(x[1][0]))})
    monkeypatch.setattr(trainer_module, "STREAM_CHECKPOINT_SECONDS", 1e-9)  # the default, made tiny
    pending = []

    class Watch(bf.Callback):
        def on_step_begin(self, trainer, step):
            pending.append(int(client.xpending("events", "g")["pending"]))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, a, b, c):
            return self.linear(torch.stack([a, b, c], 1)).squeeze(1)

    net = Net()
    trainer = bf.Trainer(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.05), batch_size=4, progress=False,
                         checkpoint_dir=tmp_path / "ckpt", callbacks=[Watch()])
    trainer.fit(bf.StreamSource(bf.RedisStream(redis_server, "events", group="g", fields=("a", "b", "c", "y"),
                                               idle_timeout=0.3)))
    # Checkpointed (and acknowledged) after every step, not only at the end of the stream.
    assert pending == [24, 20, 16, 12, 8, 4]
    client.close()


def test_checkpoint_seconds_is_checked(tmp_path):
    with pytest.raises(bf.BatchfitError, match=r"`checkpoint_seconds` must be a positive number of seconds"):
        _trainer(tmp_path, checkpoint_seconds=0)
    with pytest.raises(bf.BatchfitError, match=r"`checkpoint_dir` must be a folder when checkpoint_seconds is set"):
        _trainer(tmp_path, checkpoint_dir=None, checkpoint_seconds=5)


def test_history_of_a_long_stream_stays_bounded_and_metrics_csv_keeps_every_row(tmp_path):
    events = _events(400)  # 100 steps of 4
    folder = tmp_path / "run"
    first = _trainer(tmp_path, checkpoint_every=25, keep_checkpoints=10, callbacks=[bf.CSVLogger(folder)])
    first.history.keep = 10
    first.fit(bf.StreamSource(events), max_steps=60)
    assert len(first.history) <= 12 and first.history.total == 60 and first.history.dropped >= 48
    # A resumed run (its history restored with its dropped rows counted) finishes the stream.
    second = _trainer(tmp_path, checkpoint_every=25, keep_checkpoints=10, callbacks=[bf.CSVLogger(folder)])
    second.history.keep = 10
    history = second.fit(bf.StreamSource(events), resume=True)
    assert second.step == 100 and len(history) <= 12 and history.column("step")[-1] == 100
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 101))  # every step once, in order
    whole = _trainer(tmp_path / "whole")
    whole.fit(bf.StreamSource(events))
    assert [float(r["loss"]) for r in rows] == pytest.approx(whole.history.losses(), rel=1e-6)
    sizes = [p.stat().st_size for p in sorted((tmp_path / "ckpt").glob("step-*.pt"))]
    assert len(sizes) == 5 and max(sizes) < 1.05 * min(sizes), sizes  # steps 25, 50, 60, 75, 100: flat
    state = torch.load(sorted((tmp_path / "ckpt").glob("step-*.pt"))[-1], weights_only=True)
    assert len(state["history"]["columns"]["step"]) <= 12 and state["history"]["dropped"] >= 88


def test_the_run_folder_metrics_csv_of_a_bounded_history_keeps_every_row(redis_server, tmp_path, monkeypatch):
    import redis

    import batchfit.train.stream_loop as stream_loop

    monkeypatch.setattr(stream_loop, "STREAM_HISTORY_ROWS", 4)
    client = redis.Redis.from_url(redis_server)
    rng = np.random.default_rng(0)
    for _ in range(40):
        client.xadd("ratings", {"user": int(rng.integers(5)), "item": int(rng.integers(6)),
                                "rating": float(rng.integers(1, 6))})
    client.close()
    path = tmp_path / "run.toml"
    path.write_text(TOML.format(url=redis_server, folder=tmp_path).replace("batch_size = 8", "batch_size = 2"))
    summary = run_config(load_config(path))
    assert summary is not None and summary["steps"] == 20
    with open(tmp_path / "runs" / summary["run_dir"].rsplit("/", 1)[-1] / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(1, 21))  # written by the CSVLogger before they were dropped, kept by the end


def test_checkpoint_seconds_works_for_data_sets_too(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)
    trainer = _trainer(tmp_path, checkpoint_seconds=1e-9, keep_checkpoints=100)
    trainer.fit((x, x[:, :1]), epochs=1)  # 4 steps of 4, each past the (tiny) interval
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*.pt")) == [
        f"step-{step:09d}.pt" for step in (1, 2, 3, 4)]
