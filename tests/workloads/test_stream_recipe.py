"""The MovieLens-100k recipe: real ratings in time order, a matrix factorisation trained test-then-train."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import batchfit as bf

pytest.importorskip("pandas")
pytest.importorskip("recbole")  # only its data file is used; recbole itself is never imported by batchfit

from batchfit.workloads.stream import MatrixFactorization, load_movielens_100k, replay, rmse_loss  # noqa: E402


@pytest.fixture(scope="module")
def ratings():
    return load_movielens_100k()


def test_movielens_100k_loads_in_time_order(ratings):
    assert len(ratings["rating"]) == 100_000
    assert ratings["user"].max() == 942 and ratings["item"].max() == 1681 and ratings["user"].min() == 0
    assert np.all(np.diff(ratings["timestamp"]) >= 0)
    assert set(np.unique(ratings["rating"]).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.parametrize("sparse", [False, True])
def test_stream_recipe_prequential_rmse_beats_the_running_mean(ratings, sparse):
    count = 10_000
    events = list(zip(ratings["user"][:count].tolist(), ratings["item"][:count].tolist(),
                      ratings["rating"][:count].tolist()))
    model = MatrixFactorization(943, 1682, dim=16, sparse=sparse)
    optimizer = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(model.parameters(), lr=0.01)
    trainer = bf.Trainer(model, rmse_loss, optimizer, batch_size=32, progress=False)
    history = trainer.fit(bf.StreamSource(events))
    rmse = math.sqrt(history.column("preq_loss")[-1])
    # The running mean of the ratings seen so far, scored before each rating is seen (the baseline in docs/offline.md).
    seen = ratings["rating"][:count].astype(np.float64)
    means = np.concatenate([[3.5], np.cumsum(seen)[:-1] / np.arange(1, count)])
    baseline = math.sqrt(np.mean((seen - means) ** 2))
    assert trainer.samples_seen == count and rmse < baseline - 0.02, (rmse, baseline)


def test_replay_writes_the_rows_in_order(redis_server, ratings):
    import redis

    client = redis.Redis.from_url(redis_server)
    ids = replay(client, "ml", ratings, limit=50, chunk=16)
    entries = client.xrange("ml")
    assert [e[0].decode() for e in entries] == ids and len(ids) == 50
    assert float(entries[3][1][b"rating"]) == ratings["rating"][3] and int(entries[3][1][b"user"]) == ratings["user"][3]
