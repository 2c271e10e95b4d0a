"""Many reads of a file in one system call: Linux's io_uring, driven through ctypes and NumPy.

A uniform shuffle of shards larger than the mapping limit reads each row by itself, and one
``pread`` a row costs a system call (2-5 us on a virtual machine, most of it the call itself, not
the 1 KiB copied). io_uring takes a whole gather's reads at once: the reads are written into a
ring of submission entries shared with the kernel, a NumPy record array over that memory, all
fields of all entries at once; one ``io_uring_enter`` submits them and waits for them, and their
results come back in the completion ring. Reads served by the page cache complete inside the
call; reads that wait for the disk go to the kernel's workers, in parallel.

Where the kernel lacks io_uring, or forbids it (``kernel.io_uring_disabled``, a container's
seccomp filter), :func:`ring` returns ``None`` and the caller reads with ``pread``. A ring is
used by one thread of one process: each thread gets its own, and a forked child opens new ones.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import weakref

import numpy as np

ENTRIES = 1024  # submission entries of a ring: the most reads one call submits
_SETUP, _ENTER = 425, 426  # system call numbers (the same on every Linux architecture but alpha)
_GETEVENTS = 1  # IORING_ENTER_GETEVENTS
_OP_READ = 22  # IORING_OP_READ (Linux 5.6)
_FEAT_SINGLE_MMAP = 1
_OFF_SQES = 0x10000000

_SQE = np.dtype({"names": ["opcode", "fd", "off", "addr", "len", "user_data"],
                 "formats": [np.uint8, np.int32, np.uint64, np.uint64, np.uint32, np.uint64],
                 "offsets": [0, 4, 8, 16, 24, 32], "itemsize": 64})
_CQE = np.dtype({"names": ["user_data", "res"], "formats": [np.uint64, np.int32], "offsets": [0, 8],
                 "itemsize": 16})
_LOCAL = threading.local()


class Ring:
    """One io_uring instance: a submission and a completion ring mapped from the kernel."""

    def __init__(self, entries: int = ENTRIES) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        params = np.zeros(30, np.uint32)  # struct io_uring_params, 120 bytes
        fd = self._syscall(ctypes.c_long(_SETUP), ctypes.c_long(entries), ctypes.c_void_p(params.ctypes.data))
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"io_uring_setup: {os.strerror(ctypes.get_errno())}")
        self.fd, self.pid = fd, os.getpid()
        weakref.finalize(self, os.close, fd)  # the maps below keep the rings alive on their own
        try:
            sq_entries, cq_entries, features = int(params[0]), int(params[1]), int(params[5])
            sq = params[10:20]  # io_sqring_offsets: head, tail, ring_mask, ring_entries, flags, dropped, array
            cq = params[20:30]  # io_cqring_offsets: head, tail, ring_mask, ring_entries, overflow, cqes
            if not features & _FEAT_SINGLE_MMAP:  # Linux before 5.4: not worth a second layout
                raise OSError("io_uring without IORING_FEAT_SINGLE_MMAP")
            size = max(int(sq[6]) + 4 * sq_entries, int(cq[5]) + _CQE.itemsize * cq_entries)
            shared = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._rings = mmap.mmap(fd, size, flags=shared, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._sqe_map = mmap.mmap(fd, _SQE.itemsize * sq_entries, flags=shared,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQES)
        except BaseException:
            self.pid = -1  # never used
            raise
        words = np.frombuffer(self._rings, np.uint32)
        self._sq_head, self._sq_tail, self._cq_head, self._cq_tail = (
            words[int(sq[0]) // 4 : int(sq[0]) // 4 + 1], words[int(sq[1]) // 4 : int(sq[1]) // 4 + 1],
            words[int(cq[0]) // 4 : int(cq[0]) // 4 + 1], words[int(cq[1]) // 4 : int(cq[1]) // 4 + 1])
        self._sq_mask, self._cq_mask = int(words[int(sq[2]) // 4]), int(words[int(cq[2]) // 4])
        self.entries = sq_entries
        array = words[int(sq[6]) // 4 : int(sq[6]) // 4 + sq_entries]
        array[:] = np.arange(sq_entries, dtype=np.uint32)  # ring slot i submits entry i, always
        self._sqes = np.frombuffer(self._sqe_map, _SQE)
        self._cqes = np.frombuffer(self._rings, _CQE, cq_entries, int(cq[5]))

    def read(self, fd: int, offsets: np.ndarray, sizes: np.ndarray, addresses: np.ndarray) -> np.ndarray:
        """Read ``sizes[i]`` bytes at ``offsets[i]`` of file ``fd`` to memory at ``addresses[i]``.

        Returns the bytes each read got (fewer at the end of the file; negative: ``-errno``),
        after every read has completed: the kernel writes into that memory only until then.
        """
        got = np.zeros(len(offsets), dtype=np.int64)
        for lo in range(0, len(offsets), self.entries):
            hi = min(lo + self.entries, len(offsets))
            self._submit(fd, offsets[lo:hi], sizes[lo:hi], addresses[lo:hi], lo)
            self._wait(hi - lo, got)
        return got

    def _submit(self, fd: int, offsets: np.ndarray, sizes: np.ndarray, addresses: np.ndarray, first: int) -> None:
        count = len(offsets)
        tail = int(self._sq_tail[0])
        slots = (tail + np.arange(count)) & self._sq_mask
        entries = np.zeros(count, _SQE)
        entries["opcode"], entries["fd"], entries["off"] = _OP_READ, fd, offsets
        entries["addr"], entries["len"], entries["user_data"] = addresses, sizes, np.arange(first, first + count)
        self._sqes[slots] = entries
        self._sq_tail[0] = (tail + count) & 0xFFFFFFFF  # published by the system call that follows

    def _wait(self, count: int, got: np.ndarray) -> None:
        """Submit what the ring holds, then take ``count`` completions (retrying after a signal)."""
        submitted = done = 0
        while done < count:
            to_submit = count - submitted
            result = self._syscall(ctypes.c_long(_ENTER), ctypes.c_long(self.fd), ctypes.c_long(to_submit),
                                   ctypes.c_long(count - done), ctypes.c_long(_GETEVENTS), None, ctypes.c_long(0))
            if result < 0:
                error = ctypes.get_errno()
                if error not in (4, 11, 16):  # EINTR, EAGAIN, EBUSY: completions are taken below, then again
                    raise OSError(error, f"io_uring_enter: {os.strerror(error)}")
            else:
                submitted += min(result, to_submit)
            head, tail = int(self._cq_head[0]), int(self._cq_tail[0])
            if tail != head:
                ready = self._cqes[(head + np.arange((tail - head) & 0xFFFFFFFF)) & self._cq_mask]
                got[ready["user_data"].astype(np.int64)] = ready["res"]
                done += len(ready)
                self._cq_head[0] = tail


def ring() -> Ring | None:
    """This thread's ring, or ``None`` where io_uring cannot be used (then never tried again)."""
    held = getattr(_LOCAL, "ring", None)
    if held is not None and held.pid == os.getpid():
        return held
    if _UNAVAILABLE or not sys.platform.startswith("linux"):
        return None
    try:
        _LOCAL.ring = Ring()
    except (OSError, AttributeError, ValueError):
        mark_unavailable()
        return None
    return _LOCAL.ring


_UNAVAILABLE = False  # io_uring failed once in this process: every thread reads by pread


def mark_unavailable() -> None:
    """Stop using io_uring in this process (it failed): reads go by pread from now on."""
    global _UNAVAILABLE
    _UNAVAILABLE = True
