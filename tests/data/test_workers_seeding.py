"""Batches gathered in workers leave torch's global generator alone (issue 11: exact resume).

Each DataLoader iterator draws its workers' base seed from torch's global generator unless it is
given one; a run resumed mid-epoch builds one more loader than an uninterrupted run, so every
later random number (dropout masks) would shift.
"""

import numpy as np
import torch

from batchfit import Batcher


def data(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(2 * n, dtype=np.float32).reshape(n, 2), np.arange(n)


def add_noise(batch):
    """A random augmentation, drawn from torch's generator of the process that gathers."""
    x, y = batch
    return x + torch.rand(x.shape), y


def test_batcher_workers_leave_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batcher = Batcher(data(), batch_size=8, seed=1, workers=2, transform=add_noise)
    for _ in range(2):  # two epochs: two loaders
        for _ in batcher:
            pass
    batcher.load_state_dict({**batcher.state_dict(), "samples_done": 16})  # and one started mid-epoch
    list(batcher.remaining())
    assert torch.equal(torch.get_rng_state(), before)


def test_batcher_workers_transform_draws_depend_on_the_batch_not_the_worker():
    """The same batch gets the same random numbers with 1 or 2 workers, and when the loader
    starts mid-epoch (a resumed run); another epoch gets other numbers."""
    one = [x for x, _ in Batcher(data(), batch_size=8, seed=1, workers=1, transform=add_noise)]
    two = [x for x, _ in Batcher(data(), batch_size=8, seed=1, workers=2, transform=add_noise)]
    resumed = Batcher(data(), batch_size=8, seed=1, workers=2, transform=add_noise)
    resumed.load_state_dict({**resumed.state_dict(), "samples_done": 24})
    later = [x for x, _ in resumed.remaining()]
    assert len(one) == len(two) == 8 and len(later) == 5
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(one[3:], later, strict=True):
        assert torch.equal(a, b)
    next_epoch = Batcher(data(), batch_size=8, seed=1, workers=2, transform=add_noise, shuffle=False)
    next_epoch.set_epoch(1)
    first = Batcher(data(), batch_size=8, seed=1, workers=2, transform=add_noise, shuffle=False)
    assert not torch.equal(next(iter(next_epoch.remaining()))[0], next(iter(first.remaining()))[0])
