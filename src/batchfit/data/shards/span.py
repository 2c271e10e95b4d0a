"""One strided view over the memory maps of every shard of a dense array: a batch from any number
of shards gathered by one ``take``.

Each shard of an array is its own file, memory-mapped wherever the kernel chose, and a gather
that indexes each shard it touches costs a Python call per shard (98 shards: a call for nearly
every few samples of a shuffled batch), plus a sort to group the samples and a second copy to
put them back in order. But the maps all live in one address space: row ``k`` of shard ``s``
starts at address ``a_s + k * row_bytes``, and map addresses are page-aligned, so the row starts
of every shard lie on one grid of ``step`` bytes, the greatest common divisor of ``row_bytes``
and the distances between the shards' first rows (``row_bytes`` itself whenever it divides the
page size, as for 64 float32 features or an int64 label). A NumPy array whose rows are ``step``
bytes apart, from the lowest map to the end of the highest, then holds every row of every shard,
and sample ``i`` of shard ``s`` is its row ``i * (row_bytes // step) + shift[s]``: one indexing
call gathers a shuffled batch straight into place, with no sort and no reordering.

The view spans memory between the maps that is not ours, so only rows computed from checked
sample indices are read, each inside a map; a :class:`Span` holds every shard's array, which
keeps the maps mapped for as long as the view can be used.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable

import numpy as np


class Span:
    """Rows of one dense array across all shards of a folder, gathered by one call.

    ``arrays`` are the shards' memory-mapped arrays (same dtype and row shape), ``starts`` the
    global index of each shard's first sample (``len(arrays) + 1`` entries, the last the total).
    """

    def __init__(self, arrays: list[np.ndarray], starts: list[int]) -> None:
        self._arrays = arrays  # keeps the maps mapped while the view lives
        first = arrays[0]
        self.dtype, self.row_shape = first.dtype, first.shape[1:]
        row_bytes = first.dtype.itemsize * math.prod(first.shape[1:])
        addresses = [a.__array_interface__["data"][0] for a in arrays]
        filled = [(address, len(a)) for address, a in zip(addresses, arrays) if len(a)]
        low = min(address for address, _ in filled)
        high = max(address + rows * row_bytes for address, rows in filled)
        step = math.gcd(row_bytes, *(address - low for address, _ in filled))
        self.rows_per_sample = row_bytes // step
        # The sample at global index i, in shard s, is view row i * rows_per_sample + shift[s].
        self.shift = np.array([(address - low) // step - start * self.rows_per_sample if len(a) else 0
                               for address, a, start in zip(addresses, arrays, starts)], dtype=np.int64)
        count = (high - low - row_bytes) // step + 1
        memory = (ctypes.c_char * (high - low)).from_address(low)
        self.view = np.ndarray((count, *self.row_shape), self.dtype, buffer=memory,
                               strides=(step, *first.strides[1:]))
        self.view.flags.writeable = False  # the maps are read-only
        # np.take makes a non-contiguous array contiguous first: a copy of the whole span, reading
        # memory that is not ours. Overlapping rows (step < row_bytes) are indexed instead.
        self.contiguous = bool(self.view.flags.c_contiguous)

    def rows(self, indices: np.ndarray, shard: np.ndarray) -> np.ndarray:
        """The view's rows of the samples at global ``indices``, which lie in shards ``shard``."""
        scaled = indices if self.rows_per_sample == 1 else indices * self.rows_per_sample
        return scaled + self.shift.take(shard)

    def take(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows`` of the view (from :meth:`rows`) into ``out``."""
        if self.contiguous:
            # mode="clip" skips NumPy's bounds-check buffering; rows come from checked indices.
            self.view.take(rows, axis=0, out=out, mode="clip")
        else:
            out[...] = self.view[rows]


def shard_finder(sizes: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised function from global sample indices to the shards holding them.

    Every shard boundary is a multiple of ``chunk``, the greatest common divisor of the
    boundaries, so a table with one entry per chunk names the shard of every sample; where each
    shard is one chunk (shards of ``shard_size`` samples, the last maybe shorter) the table is not
    even needed: the shard is ``index // chunk``. A searchsorted over the boundaries (ten times
    slower) serves only boundaries too irregular for a small table.
    """
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
    chunk = math.gcd(*ends[:-1].tolist()) if len(ends) > 1 else 0
    if chunk == 0:  # every shard but the last is empty
        last = len(sizes) - 1
        return lambda indices: np.full(len(indices), last, dtype=np.int64)
    if int(ends[-1]) // chunk > TABLE_ENTRIES:
        return lambda indices: np.searchsorted(ends, indices, side="right")
    table = np.searchsorted(ends, np.arange(0, int(ends[-1]), chunk), side="right")
    bits = chunk.bit_length() - 1
    if np.array_equal(table, np.arange(len(table))):
        if chunk == 1 << bits:
            return lambda indices: indices >> bits
        return lambda indices: indices // chunk
    if chunk == 1 << bits:
        return lambda indices: table.take(indices >> bits)
    return lambda indices: table.take(indices // chunk)


TABLE_ENTRIES = 2**16  # the most entries of a shard finder's table (512 KiB)
