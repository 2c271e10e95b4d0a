"""Reading rows of a shard file by offset: sorted, joined into runs, one ``pread`` per run.

A memory map pays a page fault for every region of the file it touches first, and past the
mapping limit the regions are dropped and faulted again, so a uniform shuffle of data larger
than the limit pays about one fault per sample. Reading the rows with ``pread`` instead maps
nothing: the rows of a gather are sorted by file offset, rows at most :data:`MERGE_BYTES`
apart are joined into one run (the gap is read and skipped), each run is read by one call into
a buffer reused by the thread, and the rows are put back into the requested order.

On a cold page cache a run costs a disk read; :func:`will_need` asks the kernel to start
reading a gather's runs all at once (``POSIX_FADV_WILLNEED``), so that the disk serves them in
parallel instead of one ``pread`` after the other. It costs a system call per run, so a reader
asks only while its reads wait for the disk (:data:`COLD_SECONDS`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from ...errors import ShardError

MERGE_BYTES = 8 * 1024  # rows closer than this are read by one call: a call costs more than copying 8 KiB
# A pread served by the page cache takes 2-4 us, one that waits for the disk about 80 us (a
# virtio disk). Past COLD_SECONDS a run on average, a file's gathers ask the kernel to start all
# their reads at once (60 k rows/s instead of 12 k here) until a gather takes under WARM_SECONDS.
COLD_SECONDS = 40e-6
WARM_SECONDS = 6e-6
READ_AROUND = 128 * 1024  # what a fault on a memory map reads around itself (the kernel's read-ahead)
AVAILABLE = hasattr(os, "preadv")  # not on Windows: there the memory maps serve every read
_BUFFERS = threading.local()


@dataclass(frozen=True)
class Runs:
    """How to read the rows of one gather: the file offset and size of each run, and where it goes.

    Where every run is one row (``scatter`` is ``None``), ``starts`` are the byte offsets of the
    rows' destinations in the output and each run is read straight there. Otherwise the runs are
    read one after the other into a buffer (``starts`` are offsets in it) and
    ``scatter = (destinations, buffer rows)`` puts the rows into the output.
    """

    offsets: list[int]
    sizes: list[int]
    starts: list[int]
    buffer_rows: int
    scatter: tuple[np.ndarray, np.ndarray] | None


def plan_runs(rows: np.ndarray, header_bytes: int, row_bytes: int, destinations: np.ndarray | None = None) -> Runs:
    """How to read rows ``rows`` (int64 row numbers) of a file whose rows start at ``header_bytes``.

    Row ``rows[i]`` goes to output row ``destinations[i]`` (default ``i``).
    """
    destinations = np.arange(len(rows)) if destinations is None else destinations
    if len(rows) > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = np.argsort(rows, kind="stable")
        rows, destinations = rows[order], destinations[order]
    joined = rows[1:] - rows[:-1] <= MERGE_BYTES // max(1, row_bytes) + 1  # row i + 1 continues row i's run
    if not joined.any():  # the common case of a sparse gather: every row a run of its own
        return Runs((header_bytes + rows * row_bytes).tolist(), [row_bytes] * len(rows),
                    (destinations * row_bytes).tolist(), 0, None)
    cuts = np.flatnonzero(~joined) + 1
    firsts = rows[np.concatenate(([0], cuts))]
    lengths = rows[np.concatenate((cuts - 1, [len(rows) - 1]))] - firsts + 1
    slabs = np.cumsum(lengths) - lengths  # where each run starts in the buffer, in rows
    run_of = np.zeros(len(rows), dtype=np.int64)
    run_of[cuts] = 1
    np.cumsum(run_of, out=run_of)
    buffer_rows = slabs[run_of] + rows - firsts[run_of]
    return Runs((header_bytes + firsts * row_bytes).tolist(), (lengths * row_bytes).tolist(),
                (slabs * row_bytes).tolist(), int(lengths.sum()), (destinations, buffer_rows))


def read_runs(fd: int, runs: Runs, out: np.ndarray, name: object) -> None:
    """Read ``runs`` of file ``fd`` (``name`` for errors) into ``out``, a C-contiguous array of rows."""
    assert out.flags.c_contiguous, "rows are read into a C-contiguous array"
    row_bytes = out.itemsize * (out.size // max(1, len(out)))
    target = out if runs.scatter is None else buffer(runs.buffer_rows * row_bytes)
    view = target.data.cast("B")
    preadv = os.preadv
    for offset, size, start in zip(runs.offsets, runs.sizes, runs.starts):
        part = view[start : start + size]
        if preadv(fd, [part], offset) != size:
            _read_rest(fd, part, offset, name)
    if runs.scatter is not None:
        destinations, buffer_rows = runs.scatter
        table = target[: runs.buffer_rows * row_bytes].view(out.dtype).reshape(runs.buffer_rows, *out.shape[1:])
        out[destinations] = table[buffer_rows]


def will_need(fd: int, runs: Runs) -> None:
    """Ask the kernel to start reading the file around every run now (asynchronously), so a cold
    disk serves them in parallel.

    Each announcement covers the :data:`READ_AROUND` bytes around its run, as a fault on a
    memory map reads around itself: the rows next to it are read by the same disk request and
    found in the page cache when the epoch comes to them.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    announced = -1
    for offset, size in zip(runs.offsets, runs.sizes):
        start = offset // READ_AROUND * READ_AROUND
        if start != announced or offset + size > start + READ_AROUND:
            advise(fd, start, offset + size - start if offset + size > start + READ_AROUND else READ_AROUND,
                   os.POSIX_FADV_WILLNEED)
            announced = start


def buffer(nbytes: int) -> np.ndarray:
    """This thread's reusable read buffer, at least ``nbytes`` long (it grows, never shrinks)."""
    held = getattr(_BUFFERS, "array", None)
    if held is None or len(held) < nbytes:
        held = _BUFFERS.array = np.empty(max(nbytes, 2 * (0 if held is None else len(held))), dtype=np.uint8)
    return held


def _read_rest(fd: int, view: memoryview, offset: int, name: object) -> None:
    """Finish a short read (a signal, or a file shorter than its manifest says)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ShardError(f"Shard file {name} ends at byte {offset + done}, before the rows its manifest promises")
        done += got
