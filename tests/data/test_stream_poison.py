"""Poison events against a real redis-server: each kind is quarantined to the dead-letter stream, never trained
on, never blocks the consumer; the rest of its batch trains, whatever on_nan says."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf

FIELDS = ("user", "x", "y")
USERS = 10


class _Rec(torch.nn.Module):
    """A user embedding (a table of USERS rows) plus a linear term: ids past the table make it raise."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.users = torch.nn.Embedding(USERS, 1)
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, user, x):
        return self.users(user).squeeze(1) + self.linear(x.unsqueeze(1)).squeeze(1)


def _rows(count: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    return [{"user": str(int(rng.integers(USERS))), "x": repr(float(rng.standard_normal())),
             "y": repr(float(rng.standard_normal()))} for _ in range(count)]


def _produce(url: str, rows: list[dict[str, str]]) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    ids = [client.xadd("events", row).decode() for row in rows]
    client.close()
    return ids


def _trainer(tmp_path, on_nan: str = "raise", callbacks=()) -> bf.Trainer:
    model = _Rec()
    return bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                      progress=False, on_nan=on_nan, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2,
                      callbacks=list(callbacks))


class _Lineage(bf.Callback):
    """The ids of the events each step trained on, read from the source's last batch."""

    def __init__(self, source: bf.StreamSource) -> None:
        self.source, self.steps = source, []

    def on_step_end(self, trainer, record):
        assert self.source.last_batch is not None
        self.steps.append(list(self.source.last_batch.ids))


def _dead(url: str) -> list[dict[str, str]]:
    import redis

    client = redis.Redis.from_url(url)
    entries = client.xrange("events:dead")
    client.close()
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def _pending(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.xpending("events", "g")["pending"])
    finally:
        client.close()


POISON = {  # kind: (the poison event's fields, a part of its reason, found as it arrives)
    "nan rating": ({"user": "1", "x": "0.5", "y": "nan"}, "field 'y': nan is not a finite number", True),
    "huge rating": ({"user": "1", "x": "0.5", "y": "1e400"}, "field 'y': inf is not a finite number", True),
    "id past the table": ({"user": "5000", "x": "0.5", "y": "1.0"}, "the model raised IndexError", False),
    "negative id": ({"user": "-1", "x": "0.5", "y": "1.0"}, "the model raised IndexError", False),
    "id beyond int64": ({"user": "99999999999999999999", "x": "0.5", "y": "1.0"},
                        "field 'user': 99999999999999999999 does not fit in int64", True),
    "missing field": ({"user": "1", "x": "0.5"}, "has no field 'y'", True),
    "empty field": ({"user": "1", "x": "", "y": "1.0"}, "field 'x' = b'' is not a number", True),
    "text": ({"user": "1", "x": "abc", "y": "1.0"}, "field 'x' = b'abc' is not a number", True),
}


@pytest.mark.parametrize("on_nan", ["raise", "skip"])
@pytest.mark.parametrize("kind", list(POISON))
def test_poison_event_is_quarantined_and_the_rest_trains(redis_server, tmp_path, kind, on_nan, assert_close):
    fields, reason, on_arrival = POISON[kind]
    rows = _rows(16)
    rows.insert(5, fields)  # in the second batch
    ids = _produce(redis_server, rows)
    poison, good = ids[5], ids[:5] + ids[6:]
    source = bf.StreamSource(bf.RedisStream(redis_server, "events", group="g", consumer="c", fields=FIELDS,
                                            idle_timeout=0.3))
    lineage = _Lineage(source)
    trainer = _trainer(tmp_path, on_nan, [lineage])
    history = trainer.fit(source)
    trained = collections.Counter(i for step in lineage.steps for i in step)
    assert set(trained) == set(good) and max(trained.values()) == 1  # none lost, none twice
    assert poison not in trained and trainer.samples_seen == 16 and trainer.skipped_steps == 0
    dead = _dead(redis_server)
    assert [d["batchfit.id"] for d in dead] == [poison]
    assert reason in dead[0]["batchfit.reason"], dead[0]["batchfit.reason"]
    assert dead[0]["batchfit.group"] == "g" and dead[0]["batchfit.consumer"] == "c"
    assert {k: v for k, v in dead[0].items() if not k.startswith("batchfit.")} == fields  # the original fields
    assert history.column("dead_letters")[-1] == 1 and history.epochs[-1]["dead_letters"] == 1
    assert _pending(redis_server) == 0  # the poison event is acknowledged too: it never comes back
    if on_arrival:  # screened as it arrived: the batches are those of the good events alone
        assert history.column("batch_size") == [4, 4, 4, 4]
        reference = _Rec()
        plain = bf.Trainer(reference, F.mse_loss, torch.optim.SGD(reference.parameters(), lr=0.05), batch_size=4,
                           progress=False)
        plain.fit(bf.StreamSource([(int(r["user"]), float(r["x"]), float(r["y"])) for r in rows[:5] + rows[6:]]))
        assert_close(trainer.module.state_dict(), plain.module.state_dict())
    else:  # found by halving the step's batch: the step trains on the other three
        assert history.column("batch_size") == [4, 3, 4, 4, 1]
        assert lineage.steps[1] == ids[4:5] + ids[6:8]


def test_poison_in_a_pending_batch_after_a_crash_is_quarantined_again_and_nothing_is_trained_twice(
        redis_server, tmp_path):
    rows = _rows(16)
    rows.insert(9, {"user": "5000", "x": "0.5", "y": "1.0"})  # found by the step (not on arrival), in batch 3
    ids = _produce(redis_server, rows)

    def source() -> bf.StreamSource:
        return bf.StreamSource(bf.RedisStream(redis_server, "events", group="g", consumer="c", fields=FIELDS,
                                              idle_timeout=0.3))

    class Crash(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 3:  # after the poison was quarantined, before the checkpoint of step 4
                raise RuntimeError("crash")

    first = source()
    lineage = _Lineage(first)
    with pytest.raises(RuntimeError, match="crash"):
        _trainer(tmp_path, callbacks=[lineage, Crash()]).fit(first)
    kept = lineage.steps[:2]  # the checkpoint of step 2 holds these
    again = source()
    resumed = _Lineage(again)
    trainer = _trainer(tmp_path, callbacks=[resumed])
    trainer.fit(again, resume=True)
    trained = collections.Counter(i for step in kept + resumed.steps for i in step)
    assert set(trained) == set(ids) - {ids[9]} and max(trained.values()) == 1
    # Read again after the crash, the poison event is quarantined again: a dead letter at least once.
    assert [d["batchfit.id"] for d in _dead(redis_server)] == [ids[9], ids[9]]
    assert _pending(redis_server) == 0 and trainer.samples_seen == 16


def test_ranges_quarantine_ids_outside_the_table_as_they_arrive(redis_server, tmp_path):
    rows = _rows(8)
    rows.insert(2, {"user": "10", "x": "0.5", "y": "1.0"})
    ids = _produce(redis_server, rows)
    source = bf.StreamSource(bf.RedisStream(redis_server, "events", group="g", consumer="c", fields=FIELDS,
                                            idle_timeout=0.3), ranges={"user": (0, USERS)})
    history = _trainer(tmp_path).fit(source)
    assert history.column("batch_size") == [4, 4]  # taken out before any batch held it
    dead = _dead(redis_server)
    assert [d["batchfit.id"] for d in dead] == [ids[2]]
    assert dead[0]["batchfit.reason"] == "field 'user': 10 is outside its range [0, 10)"


def test_plain_iterable_dead_letters_go_to_the_source_and_the_callback():
    events = [(float(i), float(i)) for i in range(10)]
    events[3] = (float("nan"), 1.0)
    events[7] = ("abc", 1.0)
    seen = []
    source = bf.StreamSource(events, on_dead_letter=seen.append)
    model = torch.nn.Linear(1, 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = model

        def forward(self, x):
            return self.linear(x.unsqueeze(1)).squeeze(1)

    trainer = bf.Trainer(Net(), F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.01), batch_size=4,
                         progress=False)
    history = trainer.fit(source)
    assert [(d.id, d.sample is not None) for d in seen] == [(3, True), (7, True)]
    assert list(source.dead_letters) == seen and source.quarantined == 2
    assert "field '0': nan is not a finite number" == seen[0].reason
    assert "field '0': 'abc' is not a number" == seen[1].reason
    assert trainer.samples_seen == 8 and history.column("dead_letters")[-1] == 2


def test_progress_bar_shows_the_dead_letters(capsys):
    events = [(float(i), float(i)) for i in range(12)]
    events[2] = (float("inf"), 1.0)
    torch.manual_seed(0)
    linear = torch.nn.Linear(1, 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x.unsqueeze(1)).squeeze(1)

    trainer = bf.Trainer(Net(), F.mse_loss, torch.optim.SGD(linear.parameters(), lr=0.001), batch_size=4,
                         progress=True)
    trainer.fit(bf.StreamSource(events))
    assert "samples/s 1 dead letters" in capsys.readouterr().err


def test_dict_events_may_list_their_fields_in_any_order_but_not_miss_one():
    source = bf.StreamSource([{"a": 1, "b": 2.0}, {"b": 3.0, "a": 4}, {"a": 1}, {"a": 5, "b": [1.0]}])
    batch = source.next_batch(4)
    assert batch is not None and list(batch.ids) == [0, 1]
    assert batch.batch["a"].tolist() == [1, 4] and batch.batch["b"].tolist() == [2.0, 3.0]
    assert [(d.id, d.reason) for d in source.dead_letters] == [
        (2, "its fields ['a'] differ from the stream's ['a', 'b']"),
        (3, "field 'b': has shape [1]; the stream's has []")]


def test_the_column_check_of_a_chunk_agrees_with_the_check_of_each_event():
    from batchfit.data.streams import SampleCheck

    check = SampleCheck({"user": (0, 10)}, names=("user", "x", "y"))
    assert check((1, 0.5, 2)) is None  # the first event sets the fields
    good = [(1, 0.5, 2), (9, -3, 4.5), [0, 2.0, True]]
    assert check.all_good(good) and all(check(s) is None for s in good)
    for bad in [(10, 0.5, 1.0), (-1, 0.5, 1.0), (1, float("nan"), 1.0), (1, 0.5, 2**63), (1, 0.5, 10**400),
                (1, "abc", 1.0), (1, 0.5), (1, 0.5, np.float64(1.0))]:
        chunk = good + [bad]
        assert not check.all_good(chunk), bad
        assert [check(s) is None for s in chunk] == [True, True, True, isinstance(bad[-1], np.floating)], bad
    assert check.all_good([(1, 1e300, 2.0)])  # a column of floats may hold any finite one
    mixed = [(1, 1e300, 2.0), (1, 3, 2.0)]  # ints and floats, a float past int64: not proven, yet fine one by one
    assert not check.all_good(mixed) and all(check(s) is None for s in mixed)


def test_a_list_event_the_model_fails_on_is_quarantined_with_its_sample_rebuilt_from_the_columns():
    """From a plain list the events are only columns; the dead letter of an id past the embedding table still
    names it and carries its sample, and the other events of its batch train."""
    events = [(i % 4, 1.0) for i in range(12)]
    events[6] = (99, 2.5)  # past the 4 rows of the table: the model raises IndexError on it alone
    seen = []
    source = bf.StreamSource(events, on_dead_letter=seen.append)
    model = torch.nn.Embedding(4, 1)
    trainer = bf.Trainer(lambda_module(model), F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.01),
                         batch_size=4, progress=False)
    trainer.fit(source)
    assert [(d.id, d.sample) for d in seen] == [(6, (99, 2.5))]
    assert "IndexError" in seen[0].reason and trainer.samples_seen == 11


def lambda_module(embedding: torch.nn.Embedding) -> torch.nn.Module:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = embedding

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embedding(ids).squeeze(-1)

    return Net()
