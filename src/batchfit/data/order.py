"""The order of samples in an epoch: a pure function of (seed, epoch)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import expected

SHUFFLES = (False, True, "full", "block")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``epoch`` (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def epoch_order(
    num_samples: int,
    shuffle: bool | str,
    seed: int,
    epoch: int,
    block_size: int = 4096,
    window_blocks: int = 8,
) -> torch.Tensor:
    """The sample indices of epoch ``epoch`` as a 1-D int64 tensor.

    ``shuffle=False`` keeps the stored order; ``True``/``"full"`` is a uniform random
    permutation; ``"block"`` shuffles the order of contiguous blocks of ``block_size`` samples
    and then shuffles samples inside windows of ``window_blocks`` consecutive blocks, so reads
    stay mostly sequential (CorgiPile, Xu et al., SIGMOD 2022).
    """
    if shuffle is False:
        return torch.arange(num_samples, dtype=torch.int64)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if shuffle is True or shuffle == "full":
        return torch.randperm(num_samples, generator=generator)
    if shuffle == "block":
        return _block_order(num_samples, generator, block_size, window_blocks)
    raise expected("shuffle", "True, False, 'full' or 'block'", shuffle)


def _block_order(num_samples: int, generator: torch.Generator, block_size: int, window_blocks: int) -> torch.Tensor:
    num_blocks = -(-num_samples // block_size)
    block_perm = torch.randperm(num_blocks, generator=generator)
    starts = block_perm * block_size
    lengths = torch.clamp(num_samples - starts, max=block_size)
    # The indices of the blocks in their shuffled order, concatenated.
    offsets = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
    indices = torch.arange(num_samples, dtype=torch.int64) + offsets
    window = block_size * window_blocks
    for start in range(0, num_samples, window):
        chunk = indices[start : start + window]
        indices[start : start + window] = chunk[torch.randperm(chunk.shape[0], generator=generator)]
    return indices
