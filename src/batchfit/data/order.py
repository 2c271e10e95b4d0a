"""The order of samples in an epoch: a pure function of (seed, epoch)."""

from __future__ import annotations

import numpy as np

from ..errors import expected

SHUFFLES = (False, True, "full", "block", "length")
# A length-grouped shuffle sorts by length inside windows of this many batches (as Hugging Face
# does with its "megabatches" of 50): batches of alike lengths, still drawn from the whole epoch.
LENGTH_WINDOW_BATCHES = 50


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """A generator seeded from ``(seed, epoch)`` alone (NumPy's SeedSequence mixing)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch]))


def epoch_order(
    num_samples: int,
    shuffle: bool | str,
    seed: int,
    epoch: int,
    block_size: int = 512,
    window_blocks: int = 16,
    lengths: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """The sample indices of epoch ``epoch`` as a 1-D int64 array.

    ``shuffle=False`` keeps the stored order; ``True``/``"full"`` is a uniform random
    permutation; ``"block"`` shuffles the order of contiguous blocks of ``block_size`` samples
    and then shuffles samples inside windows of ``window_blocks`` consecutive blocks, so reads
    stay mostly sequential (CorgiPile, Xu et al., SIGMOD 2022). ``"length"`` draws a uniform
    permutation, sorts it by ``lengths`` (longest first) inside windows of
    ``LENGTH_WINDOW_BATCHES * batch_size`` samples and shuffles the order of the batch-sized
    runs of each window: the samples of a batch have alike lengths, so padding is small, and each
    batch is still a random draw of the window's lengths class (its samples are no longer
    independent of each other's lengths).
    """
    if shuffle is False:
        return np.arange(num_samples, dtype=np.int64)
    rng = epoch_rng(seed, epoch)
    if shuffle is True or shuffle == "full":
        return rng.permutation(num_samples).astype(np.int64, copy=False)
    if shuffle == "block":
        return _block_order(num_samples, rng, block_size, window_blocks)
    if shuffle == "length":
        if lengths is None or len(lengths) != num_samples:
            raise expected("shuffle", "'length' only for a source with variable-length arrays (NAME_lengths), "
                           "whose sample lengths it sorts by", shuffle)
        return _length_order(np.asarray(lengths), rng, batch_size)
    raise expected("shuffle", "True, False, 'full', 'block' or 'length'", shuffle)


def _length_order(lengths: np.ndarray, rng: np.random.Generator, batch_size: int) -> np.ndarray:
    order = rng.permutation(len(lengths)).astype(np.int64, copy=False)
    window = LENGTH_WINDOW_BATCHES * batch_size
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk[:] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        runs = np.array_split(chunk.copy(), np.arange(batch_size, len(chunk), batch_size))
        chunk[:] = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
    return order


def _block_order(num_samples: int, rng: np.random.Generator, block_size: int, window_blocks: int) -> np.ndarray:
    num_blocks = -(-num_samples // block_size)
    starts = rng.permutation(num_blocks).astype(np.int64) * block_size
    lengths = np.minimum(num_samples - starts, block_size)
    # Concatenate the blocks in their shuffled order: index = position + (block start - block offset).
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    indices = np.arange(num_samples, dtype=np.int64) + offsets
    window = block_size * window_blocks
    for start in range(0, num_samples, window):
        chunk = indices[start : start + window]
        rng.shuffle(chunk)  # in place: chunk is a view
    return indices
