"""Ids from an open set: HashedEmbedding maps any int64 id to a bucket of a fixed table, counts collisions in
buffers saved with the weights, and a stream run on it resumes exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.workloads.stream import HashedEmbedding, MatrixFactorization, hash_ids


def test_hash_ids_is_in_range_deterministic_and_takes_any_int64():
    ids = torch.tensor([0, 1, 2, -1, 943, 5000, 2**63 - 1, -(2**63)])
    rows = hash_ids(ids, 100)
    assert rows.dtype == torch.int64 and bool(((rows >= 0) & (rows < 100)).all())
    assert torch.equal(rows, hash_ids(ids.clone(), 100))
    assert not torch.equal(hash_ids(ids, 100, salt=1), rows)
    assert len(set(hash_ids(torch.arange(10), 1000).tolist())) == 10  # neighbours land apart


def test_collision_rate_is_measured_and_matches_the_birthday_estimate():
    table = HashedEmbedding(4000, 2)
    ids = torch.arange(1000) * 7919 + 13  # 1,000 distinct ids, 4 buckets each
    table(ids)
    table(ids[:10])  # seen again: no new collision
    stats = table.stats()
    assert abs(stats["used"] - 4000 * (1 - math.exp(-1 / 4))) < 30  # measured: 892 buckets used of 4,000
    expected = 1 - math.exp(-1000 / 4000)  # an id shares its bucket with another about this often
    shared_ids = int(sum(bool(table.shared[r]) for r in hash_ids(ids, 4000).tolist()))
    assert abs(shared_ids / 1000 - expected) < 0.05, (shared_ids, expected)
    assert table.collision_rate() == pytest.approx(shared_ids / 1000, abs=0.02)  # measured: 0.209
    assert stats["buckets"] == 4000
    table.eval()
    before = table.lookups.clone()
    table(torch.tensor([10**12]))  # eval mode (prequential scores): nothing counted
    assert torch.equal(table.lookups, before)


def _produce(url: str, rows) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    ids = [client.xadd("ratings", {"user": u, "item": i, "rating": repr(r)}).decode() for u, i, r in rows]
    client.close()
    return ids


def _rows(count: int) -> list[tuple[int, int, float]]:
    rng = np.random.default_rng(0)
    users = rng.choice([0, 5, 942, 5000, -1, 10**15], count)  # past a 943-row table, negative, huge
    return [(int(u), int(rng.integers(-3, 50)), float(rng.integers(1, 6))) for u in users]


def _trainer(folder, callbacks=()) -> bf.Trainer:
    model = MatrixFactorization(64, 32, dim=4, hashed=True)
    return bf.Trainer(model, F.mse_loss, torch.optim.Adam(model.parameters(), lr=0.01), batch_size=8, progress=False,
                      checkpoint_dir=folder, checkpoint_every=2, callbacks=list(callbacks))


def _source(url: str) -> bf.StreamSource:
    return bf.StreamSource(bf.RedisStream(url, "ratings", group="g", fields=("user", "item", "rating"),
                                          idle_timeout=0.3))


def test_hashed_matrix_factorization_trains_unseen_ids_and_resumes_exactly(redis_server, tmp_path, assert_close):
    rows = _rows(64)
    _produce(redis_server, rows)

    class Crash(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 5:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _trainer(tmp_path / "ckpt", [Crash()]).fit(_source(redis_server))
    resumed = _trainer(tmp_path / "ckpt")
    history = resumed.fit(_source(redis_server), resume=True)
    whole = _trainer(tmp_path / "whole")
    whole.fit(bf.StreamSource(rows))
    assert resumed.samples_seen == 64 and history.epochs[-1]["dead_letters"] == 0  # no id is poison now
    # Weights and the collision counters alike: the same as a run never interrupted.
    assert_close(resumed.module.state_dict(), whole.module.state_dict())
    record = history.epochs[-1]
    assert record["collision_rate.user_vectors"] == pytest.approx(resumed.module.user_vectors.collision_rate())
    assert 0 <= record["collision_rate.user_vectors"] < 1 and "collision_rate.item_bias" in record
