"""Batches gathered in worker processes equal batches gathered in the main process."""

import numpy as np
import pytest
import torch

import batchfit as bf


class SlowDecode(torch.utils.data.Dataset):
    """A map-style dataset whose samples are 'decoded' one by one (no __getitems__)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3,), float(i)), i


def test_batcher_workers_same_batches_as_main_process():
    x = np.arange(300, dtype=np.float32).reshape(100, 3)
    y = np.arange(100)
    plain = list(bf.Batcher((x, y), batch_size=16, seed=3))
    workers = bf.Batcher((x, y), batch_size=16, seed=3, workers=2)
    served = list(workers)
    assert len(served) == len(plain) == 7
    for (xa, ya), (xb, yb) in zip(plain, served):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert workers.epoch == 1


def test_batcher_workers_decode_dataset_and_transform():
    def double(batch):
        return batch[0] * 2, batch[1]

    batcher = bf.Batcher(SlowDecode(50), batch_size=8, shuffle=False, workers=2, transform=double)
    seen = torch.cat([yb for _, yb in batcher])
    assert seen.tolist() == list(range(50))
    first_x, first_y = next(iter(bf.Batcher(SlowDecode(50), batch_size=8, shuffle=False, workers=1,
                                            transform=double)))
    assert torch.equal(first_x[:, 0], first_y.float() * 2)


def test_batcher_workers_state_dict_mid_epoch_resumes_exactly():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100)
    batcher = bf.Batcher((x, y), batch_size=10, seed=1, workers=2)
    iterator = iter(batcher)
    for _ in range(4):
        next(iterator)
    state = batcher.state_dict()
    rest = [yb for _, yb in iterator]
    again = bf.Batcher((x, y), batch_size=10, seed=1)
    again.load_state_dict(state)
    assert [yb.tolist() for _, yb in again] == [yb.tolist() for yb in rest]


def test_batcher_workers_negative_refused():
    with pytest.raises(ValueError, match="`workers` must be a non-negative integer. Received: workers=-1"):
        bf.Batcher((np.zeros((4, 1)), np.zeros(4)), batch_size=2, workers=-1)
