"""HashedEmbedding's frequency threshold (a count-min sketch, a shared cold row) and expiry of rows unseen for
long: known answers, exact state dicts, and exact resumes of a stream fit with both on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.workloads.stream import HashedEmbedding, MatrixFactorization, hash_ids


def _ids_in_other_buckets(buckets: int, avoid: int, count: int, salt: int = 0) -> list[int]:
    """``count`` ids none of which hashes to bucket ``avoid``."""
    found, candidate = [], 1000
    while len(found) < count:
        if int(hash_ids(torch.tensor([candidate]), buckets, salt)) != avoid:
            found.append(candidate)
        candidate += 1
    return found


def test_an_id_reads_the_cold_row_until_seen_min_count_times():
    table = HashedEmbedding(64, 3, min_count=3)
    assert table.weight.shape == (65, 3)  # one cold row after the buckets
    cold, bucket = table.weight[64].detach().clone(), int(hash_ids(torch.tensor([7]), 64))
    own = table.weight[bucket].detach().clone()
    assert torch.equal(table(torch.tensor([7]))[0], cold)  # seen once
    assert torch.equal(table(torch.tensor([7]))[0], cold)  # twice
    assert torch.equal(table(torch.tensor([7]))[0], own)  # three times: its own row from now on
    five = table.weight[int(hash_ids(torch.tensor([5]), 64))].detach().clone()
    assert torch.equal(table(torch.tensor([[5, 5, 5]]))[0], five.expand(3, 3))  # a batch's sightings count
    stats = table.stats()
    assert stats["cold_lookups"] == 2 and stats["cold_rate"] == pytest.approx(2 / 6)
    assert stats["used"] == 2  # cold lookups do not claim a bucket
    table.eval()  # eval mode counts nothing and asks the sketch
    assert torch.equal(table(torch.tensor([7, 12345]))[:, 0], torch.stack([own, cold])[:, 0])
    assert int(table.seen_count(torch.tensor([7]))) == 3 and int(table.seen_count(torch.tensor([12345]))) == 0
    assert torch.equal(table.seen_count(torch.tensor([7])), torch.tensor([3]))


def test_the_cold_row_trains_and_buckets_stay_untouched():
    table = HashedEmbedding(32, 2, min_count=2)
    before = table.weight.detach().clone()
    table(torch.tensor([1, 2, 3])).sum().backward()
    grad = table.weight.grad
    assert grad is not None and torch.equal(grad[32], torch.full((2,), 3.0))
    assert float(grad[:32].abs().sum()) == 0.0 and torch.equal(table.weight.detach(), before)


def test_count_min_sketch_never_undercounts_and_can_overcount():
    rng = np.random.default_rng(0)
    table = HashedEmbedding(8, 1, min_count=255, sketch_width=16, sketch_depth=2)  # narrow: collisions certain
    true: dict[int, int] = {}
    for _ in range(30):
        batch = rng.zipf(1.5, 40) % 200  # repeats within a batch too
        table(torch.as_tensor(batch))
        for value in batch.tolist():
            true[value] = true.get(value, 0) + 1
    ids = sorted(true)
    estimate = table.seen_count(torch.tensor(ids)).tolist()
    capped = [min(true[i], 255) for i in ids]
    assert all(e >= c for e, c in zip(estimate, capped))
    assert any(e > c for e, c in zip(estimate, capped))  # 16 cells for ~100 ids: some share every cell
    assert max(estimate) <= 255


def test_a_bucket_unseen_for_expire_after_steps_is_reset_when_touched():
    table = HashedEmbedding(16, 2, expire_after=3, init_std=0.5, salt=1)
    bucket = int(hash_ids(torch.tensor([42]), 16, 1))
    others = _ids_in_other_buckets(16, bucket, 3, salt=1)
    table(torch.tensor([42]))  # clock 1
    with torch.no_grad():
        table.weight[bucket] = 7.0  # as if trained
    for other in others[:2]:  # clocks 2 and 3: two steps without it
        table(torch.tensor([other]))
    assert torch.equal(table(torch.tensor([42]))[0], torch.full((2,), 7.0))  # clock 4: 3 steps apart, kept
    assert table.stats()["expired"] == 0
    for other in others:  # clocks 5, 6, 7: three steps without it
        table(torch.tensor([other]))
    assert table.stats()["stale"] == 1
    out = table(torch.tensor([42]))[0]  # clock 8: 4 steps apart, reset before the lookup
    expected = torch.randn(1, 2, generator=torch.Generator().manual_seed(8 * 1_000_003 + 1))[0] * 0.5
    assert torch.equal(out, expected) and torch.equal(table.weight[bucket].detach(), expected)
    stats = table.stats()
    assert stats["expired"] == 1 and stats["used"] == 1 + len(set(hash_ids(torch.tensor(others), 16, 1).tolist()))
    assert stats["stale"] == (int(hash_ids(torch.tensor([others[0]]), 16, 1)) not in hash_ids(
        torch.tensor(others[1:]), 16, 1).tolist())  # others[0], last seen at clock 5, unless it shares a bucket
    table.eval()
    table(torch.tensor([42] * 5))
    assert int(table.clock) == 8  # eval lookups neither age nor refresh buckets


def test_expiry_clears_the_collision_bookkeeping_of_the_bucket():
    table = HashedEmbedding(1, 2, expire_after=1)  # one bucket: every id shares it
    table(torch.tensor([1, 2]))
    assert bool(table.shared[0]) and table.stats()["shared"] == 1
    table(torch.tensor([], dtype=torch.int64))  # a step without it
    table(torch.tensor([], dtype=torch.int64))
    table(torch.tensor([3]))  # reset, then a bucket with one id
    assert not bool(table.shared[0]) and int(table.owner[0]) == 3 and table.stats()["expired"] == 1


def _trained(table: HashedEmbedding, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [table(batch).detach().clone() for batch in batches]


def test_state_dict_round_trip_gives_identical_outputs():
    rng = np.random.default_rng(1)
    batches = [torch.as_tensor(rng.integers(0, 60, 12)) for _ in range(40)]
    table = HashedEmbedding(32, 4, min_count=2, expire_after=5, init_std=0.1)
    _trained(table, batches[:20])
    copy = HashedEmbedding(32, 4, min_count=2, expire_after=5, init_std=0.1)
    copy.load_state_dict(table.state_dict())
    assert {"sketch", "last_seen", "clock", "events"} <= set(table.state_dict())
    for a, b in zip(_trained(table, batches[20:]), _trained(copy, batches[20:])):
        assert torch.equal(a, b)
    for key, value in table.state_dict().items():
        assert torch.equal(value, copy.state_dict()[key]), key
    assert table.stats() == copy.stats() and table.stats()["expired"] > 0


def _rows(count: int) -> list[tuple[int, int, float]]:
    rng = np.random.default_rng(0)
    users = rng.zipf(1.3, count) % 400 - 7  # a long tail of rare ids, some negative
    return [(int(u), int(rng.integers(0, 80)), float(rng.integers(1, 6))) for u in users]


def _model() -> MatrixFactorization:
    return MatrixFactorization(64, 32, dim=4, hashed=True, min_count=2, expire_after=6, init=0.1)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _trainer(folder=None, callbacks=()) -> bf.Trainer:
    model = _model()
    return bf.Trainer(model, F.mse_loss, _optimizer(model), batch_size=8, progress=False, checkpoint_dir=folder,
                      checkpoint_every=2 if folder else None, callbacks=list(callbacks))


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stream_fit_with_min_count_and_expiry_resumes_bit_identically(tmp_path):
    rows = _rows(160)

    class Crash(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 11:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _trainer(tmp_path / "ckpt", [Crash()]).fit(bf.StreamSource(rows))
    resumed = _trainer(tmp_path / "ckpt")
    resumed.fit(bf.StreamSource(rows), resume=True)
    whole = _trainer()
    history = whole.fit(bf.StreamSource(rows))
    assert resumed.samples_seen == 160 and resumed.step == 20
    _assert_identical(resumed.module.state_dict(), whole.module.state_dict())
    _assert_identical(resumed.optimizer.state_dict()["state"][0], whole.optimizer.state_dict()["state"][0])
    stats = whole.module.user_vectors.stats()
    assert stats["cold_lookups"] > 0 and stats["expired"] > 0  # both options were at work
    assert "collision_rate.user_vectors" in history.epochs[-1]


def test_trainer_fit_equals_a_hand_written_loop_on_the_same_events():
    rows = _rows(160)
    trainer = _trainer()
    trainer.fit(bf.StreamSource(rows))
    model = _model()
    optimizer = _optimizer(model)
    for first in range(0, len(rows), 8):
        users, items, ratings = zip(*rows[first : first + 8])
        loss = F.mse_loss(model(torch.tensor(users), torch.tensor(items)), torch.tensor(ratings, dtype=torch.float32))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _assert_identical(trainer.module.state_dict(), model.state_dict())
    assert model.item_vectors.stats()["expired"] > 0


def test_options_are_checked():
    with pytest.raises(bf.InputError, match="min_count"):
        HashedEmbedding(8, 2, min_count=0)
    with pytest.raises(bf.InputError, match="at most 255"):
        HashedEmbedding(8, 2, min_count=300)
    with pytest.raises(bf.InputError, match="expire_after"):
        HashedEmbedding(8, 2, expire_after=0)
    with pytest.raises(bf.InputError, match="hashed=True"):
        MatrixFactorization(8, 8, min_count=2)
    with pytest.raises(bf.InputError, match="min_count > 1"):
        HashedEmbedding(8, 2).seen_count(torch.tensor([1]))
    plain = HashedEmbedding(8, 2)
    assert set(plain.state_dict()) == {"owner", "used", "shared", "lookups", "table.weight"}  # as before
