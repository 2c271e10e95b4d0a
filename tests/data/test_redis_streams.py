"""RedisStream against a real redis-server: the same batches and weights as a generator, acks only after a
durable checkpoint, pending events re-read after a crash, a dead consumer's events claimed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf

FIELDS = ("x0", "x1", "x2", "y")


def _rows(count: int, seed: int = 0) -> list[tuple[float, float, float, float]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 3))
    y = x @ np.array([0.5, -1.0, 2.0]) + 0.1 * rng.standard_normal(count)
    return [(float(a), float(b), float(c), float(t)) for (a, b, c), t in zip(x, y)]


class _Net(torch.nn.Module):
    """Three numbers in, one out: the event's fields are the inputs, the last one the target."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x0, x1, x2):
        return self.linear(torch.stack([x0, x1, x2], dim=1)).squeeze(1)


def _trainer(**options) -> bf.Trainer:
    net = _Net()
    return bf.Trainer(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), batch_size=4,
                      progress=False, **options)


def _client(url):
    import redis

    return redis.Redis.from_url(url)


def _produce(url: str, rows, stream: str = "events") -> list[str]:
    client = _client(url)
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.xadd(stream, dict(zip(FIELDS, map(repr, row))))
    ids = [i.decode() for i in pipe.execute()]
    client.close()
    return ids


def _stream(url: str, consumer: str = "trainer-0", **options) -> bf.RedisStream:
    options.setdefault("idle_timeout", 0.3)
    return bf.RedisStream(url, "events", group="g", consumer=consumer, fields=FIELDS, **options)


def _pending(url: str) -> int:
    return int(_client(url).xpending("events", "g")["pending"])


def test_redis_stream_same_batches_and_weights_as_generator(redis_server, assert_close):
    rows = _rows(30)
    ids = _produce(redis_server, rows)
    from_redis = _trainer()
    history = from_redis.fit(bf.StreamSource(_stream(redis_server)))
    from_list = _trainer()
    from_list.fit(bf.StreamSource(rows))
    assert_close(from_redis.module.state_dict(), from_list.module.state_dict())
    assert history.column("batch_size") == [4] * 7 + [2]
    assert _pending(redis_server) == 0  # no checkpoint_dir: acknowledged in bulk, the rest at the end
    assert history.column("lag")[-1] >= 0 and len(ids) == 30


def test_redis_stream_acks_only_after_a_durable_checkpoint(redis_server, tmp_path):
    _produce(redis_server, _rows(24))
    pending = []

    class Watch(bf.Callback):
        def on_step_begin(self, trainer, step):
            pending.append((step, _pending(redis_server)))

    trainer = _trainer(checkpoint_dir=tmp_path, checkpoint_every=2, callbacks=[Watch()])
    trainer.fit(bf.StreamSource(_stream(redis_server)))
    # All 24 events are read ahead at once; before step k+1, the checkpoints have acknowledged 8 * (k // 2).
    assert pending == [(k, 24 - 8 * (k // 2)) for k in range(6)]
    assert _pending(redis_server) == 0


def test_redis_stream_resume_rereads_pending_events_and_equals_uninterrupted(redis_server, tmp_path, assert_close):
    rows = _rows(40)
    _produce(redis_server, rows)

    class Crash(bf.Callback):
        def on_step_begin(self, trainer, step):
            if step == 5:  # batch 6 read, steps 5 trained, checkpoint at step 4
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _trainer(checkpoint_dir=tmp_path, checkpoint_every=4, callbacks=[Crash()]).fit(
            bf.StreamSource(_stream(redis_server)))
    assert _pending(redis_server) == 24  # all read ahead; the checkpoint of step 4 acknowledged 16
    resumed = _trainer(checkpoint_dir=tmp_path, checkpoint_every=4)
    history = resumed.fit(bf.StreamSource(_stream(redis_server)), resume=True)
    whole = _trainer()
    whole.fit(bf.StreamSource(rows))
    assert resumed.samples_seen == 40 and _pending(redis_server) == 0
    assert history.column("redelivered")[-1] == 24  # re-read: the 4 events of step 5 (its update lost) and 20 more
    assert_close(resumed.module.state_dict(), whole.module.state_dict())


def test_redis_stream_crash_between_checkpoint_and_ack_trains_nothing_twice(redis_server, tmp_path, assert_close):
    rows = _rows(16)
    _produce(redis_server, rows)
    failing = _stream(redis_server)
    real_ack = failing.ack

    def ack_fails(ids):
        raise ConnectionError("the connection dropped after the checkpoint was written")

    failing.ack = ack_fails
    with pytest.raises(ConnectionError):
        _trainer(checkpoint_dir=tmp_path, checkpoint_every=2).fit(bf.StreamSource(failing))
    failing.ack = real_ack
    assert _pending(redis_server) == 16  # checkpoint of step 2 written, none of the events acknowledged
    resumed = _trainer(checkpoint_dir=tmp_path, checkpoint_every=2)
    history = resumed.fit(bf.StreamSource(_stream(redis_server)), resume=True)
    whole = _trainer()
    whole.fit(bf.StreamSource(rows))
    # The checkpoint's 8 events are acknowledged on resume, not trained on again; the 8 read ahead come again.
    assert history.column("redelivered")[-1] == 8
    assert resumed.samples_seen == 16
    assert_close(resumed.module.state_dict(), whole.module.state_dict())


def test_redis_stream_checkpoint_lists_each_pending_id_once_and_resumes_exactly(redis_server, tmp_path,
                                                                                 assert_close):
    """The checkpoint lists the ids its updates include (acknowledged on resume) and the group's other pending
    ids (for a fall-back's replay): each pending id once, none twice; a resume from it is exact."""
    rows = _rows(24)
    _produce(redis_server, rows)
    failing = _stream(redis_server)

    def ack_fails(ids):
        raise ConnectionError("the process died after the checkpoint was written")

    failing.ack = ack_fails
    with pytest.raises(ConnectionError):
        _trainer(checkpoint_dir=tmp_path, checkpoint_every=2).fit(bf.StreamSource(failing))
    client = _client(redis_server)
    pending = [entry["message_id"].decode() for entry in client.xpending_range("events", "g", "-", "+", 1000)]
    client.close()
    assert len(pending) == 24  # all read ahead, none acknowledged: the group's pending list at the checkpoint
    saved = torch.load(sorted(tmp_path.glob("step-*.pt"))[-1], weights_only=True)
    (state,) = saved["stream"]["ranks"]
    stored = [str(i) for i in state["included"]] + [str(i) for i in state["position"]["pending"]]
    assert len(state["included"]) == 8  # the two steps' events
    assert len(stored) == len(pending) and sorted(stored) == sorted(pending)  # each pending id once
    resumed = _trainer(checkpoint_dir=tmp_path, checkpoint_every=2)
    history = resumed.fit(bf.StreamSource(_stream(redis_server)), resume=True)
    whole = _trainer()
    whole.fit(bf.StreamSource(rows))
    assert resumed.samples_seen == 24 and _pending(redis_server) == 0
    assert history.column("redelivered")[-1] == 16  # the included 8 acknowledged on resume, the rest read again
    assert_close(resumed.module.state_dict(), whole.module.state_dict())


def test_redis_stream_claims_the_pending_events_of_a_dead_consumer(redis_server):
    _produce(redis_server, _rows(20))
    dead = _stream(redis_server, consumer="dead")
    taken = dead.poll(6, 0)  # read, never acknowledged: then the consumer dies
    assert taken is not None and len(taken) == 6
    trainer = _trainer()
    history = trainer.fit(bf.StreamSource(_stream(redis_server, consumer="alive", claim_idle=0)))
    assert trainer.samples_seen == 20 and history.column("redelivered")[-1] == 6
    assert _pending(redis_server) == 0


def test_redis_stream_bad_events_are_named(redis_server):
    client = _client(redis_server)
    event_id = client.xadd("events", {"x0": "1.0", "x1": "oops", "x2": "0", "y": "1"}).decode()
    events = _stream(redis_server).poll(4, 0)  # read, not raised: the StreamSource quarantines it
    assert events is not None and [e.id for e in events] == [event_id] and events[0].sample is None
    assert events[0].error == "field 'x1' = b'oops' is not a number (pass decode= for other encodings)"
    client.xadd("short", {"x0": "1.0"})
    short = bf.RedisStream(redis_server, "short", fields=FIELDS).poll(4, 0)
    assert short is not None and short[0].error is not None and short[0].error.startswith("has no field 'x1'")


@pytest.mark.parametrize("call, message", [
    (lambda: bf.RedisStream(5, "events"), r"`client` must be a redis.Redis client or a redis:// URL"),
    (lambda: bf.RedisStream("redis://127.0.0.1:1/0", ""), r"`stream` must be a non-empty string"),
    (lambda: bf.RedisStream("redis://127.0.0.1:1/0", "s", fields="xy"), r"`fields` must be a sequence of field"),
    (lambda: bf.RedisStream("redis://127.0.0.1:1/0", "s", claim_idle=-1), r"`claim_idle` must be a non-negative"),
])
def test_redis_stream_bad_arguments_are_refused(call, message):
    pytest.importorskip("redis")
    with pytest.raises(bf.BatchfitError, match=message):
        call()
