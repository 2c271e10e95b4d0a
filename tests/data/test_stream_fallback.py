"""A damaged newest checkpoint never loses acknowledged events: the run falls back to the one before and reads
the events acknowledged since from the stream again (or refuses when the stream no longer holds them); a run
whose every checkpoint is unreadable refuses to start over silently."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf

FIELDS = ("x0", "x1", "y")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x0, x1):
        return self.linear(torch.stack([x0, x1], 1)).squeeze(1)


def _rows(count: int) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 2))
    return [(float(a), float(b), float(a - 2 * b)) for a, b in x]


def _produce(url: str, rows) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    ids = [client.xadd("events", dict(zip(FIELDS, map(repr, row)))).decode() for row in rows]
    client.close()
    return ids


def _source(url: str, read_ahead: int = 512) -> bf.StreamSource:
    source = bf.StreamSource(bf.RedisStream(url, "events", group="g", consumer="c", fields=FIELDS, idle_timeout=0.3))
    source.read_ahead = read_ahead  # 4: a batch at a time, so that events are delivered after each checkpoint
    return source


def _trainer(folder, callbacks=()) -> bf.Trainer:
    net = _Net()
    return bf.Trainer(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), batch_size=4,
                      progress=False, checkpoint_dir=folder, checkpoint_every=2, keep_checkpoints=10,
                      callbacks=list(callbacks))


class _Log(bf.Callback):
    """Which events each step trained on, as (step, ids); and a crash at ``crash_at``."""

    def __init__(self, source, crash_at: int | None = None) -> None:
        self.source, self.crash_at, self.steps = source, crash_at, []

    def on_step_end(self, trainer, record):
        self.steps.append((record["step"], list(self.source.last_batch.ids)))
        if record["step"] == self.crash_at:
            raise RuntimeError("crash")


def _crash_and_damage(url, folder, read_ahead: int, crash_at: int = 7) -> _Log:
    first = _source(url, read_ahead)
    log = _Log(first, crash_at)
    with pytest.raises(RuntimeError, match="crash"):
        _trainer(folder, [log]).fit(first)
    os.truncate(folder / "step-000000006.pt", 1000)  # `truncate -s 1000` of the newest checkpoint
    return log


def _pending(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.xpending("events", "g")["pending"])
    finally:
        client.close()


@pytest.mark.parametrize("read_ahead", [512, 4])
def test_fallback_reads_the_events_acknowledged_since_again_and_equals_an_uninterrupted_run(
        redis_server, tmp_path, assert_close, read_ahead):
    rows = _rows(40)
    ids = _produce(redis_server, rows)
    folder = tmp_path / "ckpt"
    first = _crash_and_damage(redis_server, folder, read_ahead)
    # The checkpoint of step 6 acknowledged the events of steps 1-6; the rest read are pending.
    assert _pending(redis_server) == (40 if read_ahead == 512 else 28) - 24
    again = _source(redis_server, read_ahead)
    log = _Log(again)
    resumed = _trainer(folder, [log])
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable checkpoint .*step-000000006\.pt"):
        history = resumed.fit(again, resume=True)
    # The lineage of the final weights: steps 1-4 (the checkpoint it fell back to), then the resumed steps.
    lineage = [ids_ for step, ids_ in first.steps if step <= 4] + [ids_ for _, ids_ in log.steps]
    counts = collections.Counter(i for step in lineage for i in step)
    assert set(counts) == set(ids) and max(counts.values()) == 1, "an event lost or trained twice"
    assert log.steps[0][0] == 5 and log.steps[0][1] == ids[16:20]  # the acknowledged events of step 5 come first
    assert resumed.samples_seen == 40 and _pending(redis_server) == 0
    assert history.column("redelivered")[-1] >= 8
    net = _Net()
    reference = bf.Trainer(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), batch_size=4,
                           progress=False)
    reference.fit(bf.StreamSource(rows))
    assert_close(resumed.module.state_dict(), reference.module.state_dict())


@pytest.mark.parametrize("read_ahead", [512, 4])
@pytest.mark.parametrize("how", ["trimmed", "deleted"])
def test_fallback_refuses_when_the_stream_no_longer_holds_the_events(redis_server, tmp_path, how, read_ahead):
    import redis

    ids = _produce(redis_server, _rows(40))
    folder = tmp_path / "ckpt"
    _crash_and_damage(redis_server, folder, read_ahead)
    client = redis.Redis.from_url(redis_server)
    if how == "trimmed":
        client.xtrim("events", minid=ids[20], approximate=False)  # step 5, acknowledged after step 4
    else:
        client.xdel("events", ids[17])
    client.close()
    trainer = _trainer(folder)
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        with pytest.raises(bf.CheckpointError, match=r"the newer checkpoints step-000000006\.pt are unreadable and "
                                                     r"step-000000004\.pt is older.*deleted or trimmed"):
            trainer.fit(_source(redis_server), resume=True)
    assert trainer.step == 4  # loaded, then refused before any step


def test_fallback_of_a_plain_iterable_reads_again_from_the_older_position(tmp_path, assert_close):
    rows = _rows(40)
    folder = tmp_path / "ckpt"
    source = bf.StreamSource(rows)
    with pytest.raises(RuntimeError, match="crash"):
        _trainer(folder, [_Log(source, crash_at=7)]).fit(source)
    os.truncate(folder / "step-000000006.pt", 1000)
    resumed = _trainer(folder)
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        resumed.fit(bf.StreamSource(rows), resume=True)
    reference = _trainer(tmp_path / "whole")
    reference.fit(bf.StreamSource(rows))
    assert resumed.samples_seen == 40
    assert_close(resumed.module.state_dict(), reference.module.state_dict())


@pytest.mark.parametrize("data", ["stream", "arrays"])
def test_every_checkpoint_unreadable_refuses_to_start_over(tmp_path, data):
    rows = _rows(40)
    folder = tmp_path / "ckpt"
    if data == "stream":
        source = bf.StreamSource(rows)
        _trainer(folder).fit(source)
        train = bf.StreamSource(rows)
    else:
        x = np.array([r[:2] for r in rows], np.float32)
        train = (x, x[:, :1])
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4, progress=False,
                   checkpoint_dir=folder, checkpoint_every=2).fit(train)
    files = sorted(folder.glob("step-*.pt"))
    assert files
    for path in files:
        os.truncate(path, 1000)
    if data == "stream":
        trainer = _trainer(folder)
    else:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                             progress=False, checkpoint_dir=folder, checkpoint_every=2)
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        with pytest.raises(bf.CheckpointError, match=r"every checkpoint in .* is unreadable \(step-.*\); resume=True "
                                                     r"does not start over in their place\. To start fresh, move them "
                                                     r"away \(or use another checkpoint_dir\), or call "
                                                     r"fit\(resume=False\)"):
            trainer.fit(train, resume=True)
    assert trainer.step == 0
