"""Background prefetching of batches, and host-to-device copies that overlap compute."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any, TypeVar

import torch

from ..core.batch import Batch, tensors_of, to_device

T = TypeVar("T")
_DONE, _PAUSED = object(), object()

# Handing an item over between threads wakes the other one up: 20-100 us a batch measured on 2
# shared cores (``batchfit bench``), whatever the primitive (queue, semaphores) and the GIL's
# switch interval; the item itself is passed by reference, never copied. With a thread an item
# costs max(produce, use) + hand-over instead of produce + use, if the machine has a core free
# for it, so a thread is tried only where producing an item and using it each take several
# hand-overs (more than PAYS_SECONDS on average over a probe of PROBE_BATCHES items), and kept
# only while the items come faster than they did without it (KEEP_BELOW of the time).
PAYS_SECONDS = 5e-4
PROBE_BATCHES = 8
KEEP_BELOW = 0.97


def prefetch_iter(items: Iterable[T], depth: int) -> Generator[T, None, None]:
    """Iterate ``items``, producing up to ``depth`` of them ahead in a thread where that pays.

    Items are produced in the caller's thread, which times producing each item and using it.
    Once both averaged more than :data:`PAYS_SECONDS` over :data:`PROBE_BATCHES` items, a daemon
    thread produces the next ones; if the next probe's items do not come faster than without it,
    the thread hands back what it produced and stops, and the next try waits twice as long. The
    items and their order are the same either way.
    """
    iterator = iter(items)
    wait = 0  # probes to let pass before trying the thread (again)
    while True:
        seconds = yield from _in_caller(iterator, wait)
        if seconds is None:
            return
        if (yield from _in_thread(iterator, depth, seconds)):
            return
        wait = max(1, 2 * wait)


def _in_caller(iterator: Iterator[T], wait: int) -> Generator[T, None, float | None]:
    """Items produced here until, after ``wait`` probes, one says a thread may pay.

    Returns the seconds an item took (produced and used) in that probe, or ``None`` at the end.
    While probes find a thread far from paying, the items between probes pass untimed, up to
    :data:`PROBE_BATCHES` squared of them, so that quick items (from memory) cost almost nothing.
    """
    budget = PAYS_SECONDS * PROBE_BATCHES
    clock = time.perf_counter
    probes, untimed = 0, 0
    while True:
        yield from itertools.islice(iterator, untimed)
        producing = using = 0.0
        for _ in range(PROBE_BATCHES):
            start = clock()
            try:
                item = next(iterator)
            except StopIteration:
                return None
            handed = clock()
            producing += handed - start
            yield item
            using += clock() - handed
        probes += 1
        if probes > wait and min(producing, using) > budget:
            return (producing + using) / PROBE_BATCHES
        far = min(producing, using) < budget / 4
        untimed = min(2 * untimed + PROBE_BATCHES, PROBE_BATCHES**2) if far else 0


def _in_thread(iterator: Iterator[T], depth: int, seconds: float) -> Generator[T, None, bool]:
    """Items produced by a thread while they come faster than ``seconds`` each; whether they ran out."""
    ahead = _Ahead(iterator, depth)
    clock = time.perf_counter
    try:
        start, counted = clock(), 0
        for item in ahead:
            yield item
            counted += 1
            if counted == PROBE_BATCHES:
                if clock() - start > KEEP_BELOW * seconds * counted:
                    yield from ahead.pause()  # not faster: the items it has, then back to the caller
                    return ahead.finished
                start, counted = clock(), 0
        return ahead.finished
    finally:
        ahead.abandon()


class _Ahead:
    """A daemon thread that produces items of an iterator up to ``depth`` ahead.

    Iterating yields them until the iterator runs out (:attr:`finished`) or the thread pauses;
    :meth:`pause` stops it after the item it is producing and yields every item it produced, so
    that the caller can go on with the iterator. An exception in the thread is re-raised in the
    caller; :meth:`abandon` (the caller stopped early) lets the thread drop its item and end.
    """

    def __init__(self, iterator: Iterator[Any], depth: int) -> None:
        self.slots: queue.Queue[tuple[Any, Any]] = queue.Queue(maxsize=depth)
        self.pausing, self.abandoned = threading.Event(), threading.Event()
        self.finished = False
        threading.Thread(target=self._produce, args=(iterator,), name="batchfit-prefetch", daemon=True).start()

    def _produce(self, iterator: Iterator[Any]) -> None:
        try:
            while not self.pausing.is_set():
                try:
                    item = next(iterator)
                except StopIteration:
                    self._put(_DONE, None)
                    return
                if not self._put(True, item):
                    return
            self._put(_PAUSED, None)
        except BaseException as error:  # handed to the caller
            self._put(False, error)

    def _put(self, kind: Any, item: Any) -> bool:
        while not self.abandoned.is_set():
            try:
                self.slots.put((kind, item), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while not self.finished:
            kind, item = self.slots.get()
            if kind is True:
                yield item
            elif kind is False:
                raise item
            else:
                self.finished = kind is _DONE
                return

    def pause(self) -> Iterator[Any]:
        """Stop after the item being produced; the items produced so far."""
        self.pausing.set()
        yield from self

    def abandon(self) -> None:
        """The caller stopped: the thread drops what it holds and ends."""
        self.abandoned.set()


def thread_prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate ``items`` while a daemon thread produces up to ``depth`` of them ahead, always.

    An exception in the thread is re-raised in the caller. Stopping early (``break`` or garbage
    collection of the iterator) stops the thread.
    """
    ahead = _Ahead(iter(items), depth)
    try:
        yield from ahead
    finally:
        ahead.abandon()


def device_prefetch(items: Iterable[tuple[Batch, T]], device: torch.device,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[Batch, T]]:
    """``(batch, tag)`` pairs with each batch already on ``device``, the next copied while the current computes.

    The tag (a batcher's :class:`~batchfit.data.batcher.Position`, or anything) travels with its
    batch untouched. On CUDA the copy of batch k+1 is issued on a side stream before batch k is
    handed out, and the compute stream waits on it only when k+1 is used, so copies overlap
    compute with no host synchronisation. Elsewhere this is a plain ``to_device``.
    """
    if device.type != "cuda":
        passthrough = None  # decided on the first batch: batches of a source keep their dtypes
        for batch, tag in items:
            if passthrough:
                yield batch, tag
                continue
            moved = to_device(batch, device, dtype)
            if passthrough is None:
                passthrough = all(a is b for a, b in zip(tensors_of(moved), tensors_of(batch)))
            yield moved, tag
        return
    stream = torch.cuda.Stream(device=device)
    iterator = iter(items)

    def issue() -> tuple[Batch, T, torch.cuda.Event] | None:
        try:
            host, tag = next(iterator)
        except StopIteration:
            return None
        with torch.cuda.stream(stream):
            moved = to_device(host, device, dtype)
            ready = torch.cuda.Event()
            ready.record(stream)
        return moved, tag, ready

    pending = issue()
    while pending is not None:
        moved, tag, ready = pending
        torch.cuda.current_stream(device).wait_event(ready)
        for t in tensors_of(moved):
            # The tensor was allocated on the side stream; tell the allocator that the
            # compute stream uses it so its memory is not reused too early.
            t.record_stream(torch.cuda.current_stream(device))
        pending = issue()
        yield moved, tag
