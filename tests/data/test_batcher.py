"""The Batcher: every sample once per epoch, ranks that add up to the batch, exact positions."""

import numpy as np
import pytest
import torch

from batchfit import ArraySource, Batcher, BatchfitError
from batchfit.data.order import epoch_order


def ids(n: int) -> ArraySource:
    """A source whose single array holds each sample's own index, so batches show which samples they hold."""
    return ArraySource(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64) * 10)


def epoch_ids(batcher: Batcher) -> list[list[int]]:
    """The sample ids of each batch of one epoch."""
    return [batch[0].tolist() for batch in batcher]


def as_list(order) -> list[int]:
    return torch.as_tensor(np.asarray(order)).tolist()


@pytest.mark.parametrize(("num_samples", "batch_size", "drop_last"), [
    (n, b, drop) for n in (1, 7, 10, 33) for b in (1, 3, 4, 10) for drop in (False, True)
    if not (drop and b > n)  # refused: see test_batcher_batch_size_larger_than_data_with_drop_last
])
def test_batcher_ranks_together_see_each_single_process_batch(num_samples, batch_size, drop_last):
    single = Batcher(ids(num_samples), batch_size, shuffle=True, drop_last=drop_last, seed=5)
    ranks = [Batcher(ids(num_samples), batch_size, shuffle=True, drop_last=drop_last, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(2):  # two epochs
        expected = list(single)
        shares = [list(b) for b in ranks]
        assert len(shares[0]) == len(shares[1]) == len(expected)
        for whole, part0, part1 in zip(expected, *shares):
            for column in range(2):
                assert torch.equal(torch.cat([part0[column], part1[column]]), whole[column])
            # the first ranks get the extra samples of an odd share
            assert 0 <= part0[0].shape[0] - part1[0].shape[0] <= 1


def test_batcher_three_ranks_last_partial_batch():
    single = Batcher(ids(11), 4, shuffle=True, seed=1)
    ranks = [Batcher(ids(11), 4, shuffle=True, seed=1, rank=r, world_size=3) for r in range(3)]
    shares = [list(b) for b in ranks]
    for whole, *parts in zip(list(single), *shares):
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert [s[-1][0].shape[0] for s in shares] == [1, 1, 1]  # the last batch holds 3 samples


@pytest.mark.parametrize("shuffle", [False, True, "full", "block"])
def test_batcher_every_sample_once_per_epoch(shuffle):
    batcher = Batcher(ids(103), 10, shuffle=shuffle, block_size=8, window_blocks=2)
    for _ in range(3):
        seen = [i for batch in epoch_ids(batcher) for i in batch]
        assert sorted(seen) == list(range(103))


def test_batcher_drop_last_leaves_out_only_the_remainder():
    batcher = Batcher(ids(103), 10, shuffle=True, drop_last=True)
    for epoch in range(3):
        batches = epoch_ids(batcher)
        assert [len(b) for b in batches] == [10] * 10
        seen = [i for b in batches for i in b]
        assert len(set(seen)) == 100
        order = as_list(epoch_order(103, True, 0, epoch))
        assert set(range(103)) - set(seen) == set(order[100:])
    assert len(batcher) == 10


def test_batcher_len_counts_the_last_partial_batch():
    assert len(Batcher(ids(103), 10)) == 11
    assert len(Batcher(ids(100), 10)) == 10


def test_batcher_unshuffled_keeps_stored_order():
    assert epoch_ids(Batcher(ids(7), 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_batcher_same_seed_same_order():
    first, second = Batcher(ids(50), 8, seed=3), Batcher(ids(50), 8, seed=3)
    for _ in range(2):
        assert epoch_ids(first) == epoch_ids(second)


def test_batcher_next_epoch_and_other_seed_change_the_order():
    batcher = Batcher(ids(50), 8, seed=3)
    epoch0, epoch1 = epoch_ids(batcher), epoch_ids(batcher)
    assert epoch0 != epoch1
    assert epoch0 != epoch_ids(Batcher(ids(50), 8, seed=4))


def test_batcher_order_is_a_function_of_seed_and_epoch():
    walked = Batcher(ids(50), 8, seed=9)
    for _ in range(3):
        list(walked)
    jumped = Batcher(ids(50), 8, seed=9)
    jumped.set_epoch(3)
    assert epoch_ids(walked) == epoch_ids(jumped)
    assert [i for b in epoch_ids(jumped) for i in b] == as_list(epoch_order(50, True, 9, 4))


def test_batcher_yields_torch_tensors_and_tracks_the_epoch():
    batcher = Batcher(ids(5), 2)
    batch = next(iter(batcher))
    assert all(isinstance(t, torch.Tensor) for t in batch)
    assert batcher.epoch == 0
    list(batcher)
    assert batcher.epoch == 1


def test_batcher_transform_is_applied_to_whole_batches():
    batcher = Batcher(ids(6), 3, shuffle=False, transform=lambda batch: (batch[0] * 2, batch[1]))
    assert epoch_ids(batcher) == [[0, 2, 4], [6, 8, 10]]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batcher_state_dict_mid_epoch_restores_the_remaining_batches(prefetch):
    batcher = Batcher(ids(43), 5, seed=2, prefetch=prefetch)
    list(batcher)  # into epoch 1
    iterator = iter(batcher)
    for _ in range(3):
        next(iterator)
    state = batcher.state_dict()
    rest = [b[0].tolist() for b in iterator]
    assert len(rest) == 9 - 3

    restored = Batcher(ids(43), 5, seed=2, prefetch=prefetch)
    restored.load_state_dict(state)
    assert epoch_ids(restored) == rest
    assert epoch_ids(restored) == epoch_ids(batcher)  # and the epochs after it agree too


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batcher_state_dict_after_batch_size_change_mid_epoch(prefetch):
    batcher = Batcher(ids(60), 4, seed=7, prefetch=prefetch)
    iterator = iter(batcher)
    served = [next(iterator)[0].tolist() for _ in range(2)]
    batcher.batch_size = 7
    served.append(next(iterator)[0].tolist())
    state = batcher.state_dict()
    rest = [b[0].tolist() for b in iterator]

    restored = Batcher(ids(60), 4, seed=7, prefetch=prefetch)
    restored.load_state_dict(state)
    assert [b[0].tolist() for b in restored.remaining()] == rest
    assert [len(b) for b in rest] == [7] * 6 + [3]  # 60 = 4 + 4 + 7 + 6 * 7 + 3
    assert sorted(i for b in served + rest for i in b) == list(range(60))


def test_batcher_load_state_dict_refuses_another_seed():
    state = Batcher(ids(10), 2, seed=1).state_dict()
    with pytest.raises(BatchfitError, match=r"seed=1.*seed=2"):
        Batcher(ids(10), 2, seed=2).load_state_dict(state)


def test_batcher_prefetch_stops_when_abandoned():
    batcher = Batcher(ids(100), 3, prefetch=2)
    iterator = iter(batcher)
    next(iterator)
    iterator.close()
    assert batcher.samples_done == 3


@pytest.mark.parametrize(("value", "shown"), [(0, "0"), (-3, "-3"), (2.5, "2.5"), (True, "True"), ("64", "'64'")])
def test_batcher_bad_batch_size(value, shown):
    with pytest.raises(ValueError, match=rf"`batch_size` must be a positive integer\. Received: batch_size={shown}"):
        Batcher(ids(10), value)


def test_batcher_batch_size_larger_than_data_with_drop_last():
    with pytest.raises(ValueError, match=r"`batch_size` must be at most the number of samples \(10\) when "
                                         r"drop_last=True\. Received: batch_size=11"):
        Batcher(ids(10), 11, drop_last=True)
    assert epoch_ids(Batcher(ids(10), 11, shuffle=False)) == [list(range(10))]


def test_batcher_bad_shuffle():
    with pytest.raises(ValueError, match=r"`shuffle` must be one of False, True, 'full', 'block', 'length'\. "
                                         r"Received: shuffle='yes'"):
        Batcher(ids(10), 2, shuffle="yes")


def test_batcher_bad_rank():
    with pytest.raises(ValueError, match=r"`rank` must be smaller than world_size=2\. Received: rank=2"):
        Batcher(ids(10), 2, rank=2, world_size=2)


def test_batcher_empty_data():
    with pytest.raises(ValueError, match=r"`src` must be at least one sample"):
        Batcher((np.zeros((0, 2)), np.zeros(0)), 2)
