"""Reading rows of a shard file by offset: sorted, joined into runs, all runs of a gather read at once.

A memory map pays a page fault for every region of the file it touches first, and past the
mapping limit the regions are dropped and faulted again, so a uniform shuffle of data larger
than the limit pays about one fault per sample. Reading the rows instead maps nothing: the rows
of a gather are sorted by file offset, rows at most :data:`MERGE_BYTES` apart are joined into
one run (the gap is read and skipped), a run of one row is read straight to its place in the
output and a longer one into a buffer reused by the thread, whose rows are then put in place.
All runs of a gather are submitted to io_uring in one system call where the kernel allows it
(shards/uring.py; 1.3-1.4x the rows/s of a ``pread`` each, measured on a 2-vCPU VM), else read
by one ``pread`` each.

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
from . import uring

MERGE_BYTES = 8 * 1024  # rows closer than this are read by one call: a call costs more than copying 8 KiB
# A pread served by the page cache takes 2-4 us, one that waits for the disk about 80 us (a
# virtio disk). Past COLD_SECONDS a run on average, a file's gathers ask the kernel to start all
# their reads at once (60 k rows/s instead of 12 k here) until a gather takes under WARM_SECONDS.
COLD_SECONDS = 40e-6
WARM_SECONDS = 6e-6
READ_AROUND = 128 * 1024  # what a fault on a memory map reads around itself (the kernel's read-ahead)
URING_RUNS = 4  # gathers of at least this many runs submit them to io_uring (shards/uring.py), where available
AVAILABLE = hasattr(os, "preadv")  # not on Windows: there the memory maps serve every read
_BUFFERS = threading.local()


@dataclass(frozen=True)
class Runs:
    """How to read the rows of one gather: the file offset and size of each run, and where it goes.

    A run of one row is read straight to its place in the output: ``starts`` is the byte offset
    of that place. The runs that join several rows (``in_buffer``; ``None``: there are none) are
    read into a buffer, at ``starts`` in it, and ``scatter = (destinations, buffer rows)`` then
    puts their rows into the output.
    """

    offsets: np.ndarray  # int64, in file order
    sizes: np.ndarray
    starts: np.ndarray
    in_buffer: np.ndarray | None  # bool per run
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
        return Runs(header_bytes + rows * row_bytes, np.full(len(rows), row_bytes, dtype=np.int64),
                    destinations * row_bytes, None, 0, None)
    cuts = np.flatnonzero(~joined) + 1
    heads, tails = np.concatenate(([0], cuts)), np.concatenate((cuts - 1, [len(rows) - 1]))
    firsts = rows[heads]
    lengths = rows[tails] - firsts + 1
    in_buffer = heads != tails  # runs of several samples (or one sample asked twice)
    slabs = np.cumsum(np.where(in_buffer, lengths, 0))
    slabs -= lengths * in_buffer  # where each buffered run starts in the buffer, in rows
    run_of = np.zeros(len(rows), dtype=np.int64)
    run_of[cuts] = 1
    np.cumsum(run_of, out=run_of)
    buffered = in_buffer[run_of]  # the samples read through the buffer
    starts = np.where(in_buffer, slabs, destinations[heads]) * row_bytes
    buffer_rows = (slabs[run_of] + rows - firsts[run_of])[buffered]
    return Runs(header_bytes + firsts * row_bytes, lengths * row_bytes, starts, in_buffer,
                int((lengths * in_buffer).sum()), (destinations[buffered], buffer_rows))


def read_runs(fd: int, runs: Runs, out: np.ndarray, name: object) -> None:
    """Read ``runs`` of file ``fd`` (``name`` for errors) into ``out``, a C-contiguous array of rows."""
    assert out.flags.c_contiguous, "rows are read into a C-contiguous array"
    row_bytes = out.itemsize * (out.size // max(1, len(out)))
    held = buffer(runs.buffer_rows * row_bytes) if runs.in_buffer is not None else out
    views = (out.data.cast("B"), held.data.cast("B"))
    ring = uring.ring() if len(runs.offsets) >= URING_RUNS else None
    if ring is not None:
        addresses = runs.starts + (out.ctypes.data if runs.in_buffer is None
                                   else np.where(runs.in_buffer, held.ctypes.data, out.ctypes.data))
        try:
            got = ring.read(fd, runs.offsets, runs.sizes, addresses)
        except OSError:  # the ring failed: nothing of it is used again, every run is read by pread
            uring.mark_unavailable()
            got = np.zeros(len(runs.offsets), dtype=np.int64)
        for run in np.flatnonzero(got != runs.sizes).tolist():  # short reads and errors: by pread
            done, start = max(0, int(got[run])), int(runs.starts[run])
            view = views[runs.in_buffer is not None and bool(runs.in_buffer[run])]
            _read_rest(fd, view[start + done : start + int(runs.sizes[run])], int(runs.offsets[run]) + done, name)
    else:
        preadv = os.preadv
        places = [False] * len(runs.offsets) if runs.in_buffer is None else runs.in_buffer.tolist()
        for offset, size, start, place in zip(runs.offsets.tolist(), runs.sizes.tolist(), runs.starts.tolist(),
                                              places):
            part = views[place][start : start + size]
            if preadv(fd, [part], offset) != size:
                _read_rest(fd, part, offset, name)
    if runs.scatter is not None:
        destinations, buffer_rows = runs.scatter
        table = held[: runs.buffer_rows * row_bytes].view(out.dtype).reshape(runs.buffer_rows, *out.shape[1:])
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
    for offset, size in zip(runs.offsets.tolist(), runs.sizes.tolist()):
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
