"""Background prefetching of batches, and host-to-device copies that overlap compute."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any, TypeVar

import torch

from ..core.batch import Batch, tensors_of, to_device

T = TypeVar("T")
_DONE = object()

# Handing an item over between threads wakes the other one up: 40-100 us a batch measured on 2
# shared cores (``batchfit bench``), whatever the primitive (queue, semaphores) and the GIL's
# switch interval; the item itself is passed by reference, never copied. With a thread an item
# costs max(produce, use) + hand-over instead of produce + use, so a thread pays only where
# producing an item and using it each take several hand-overs: more than PAYS_SECONDS on
# average over a probe of PROBE_BATCHES items.
PAYS_SECONDS = 5e-4
PROBE_BATCHES = 8


def prefetch_iter(items: Iterable[T], depth: int) -> Generator[T, None, None]:
    """Iterate ``items``, producing up to ``depth`` of them ahead in a thread once that pays.

    Items are produced in the caller's thread while a thread would not pay; the time taken to
    produce each item and the time the caller spends with it are measured, and once both
    averaged more than :data:`PAYS_SECONDS` over :data:`PROBE_BATCHES` items, a daemon thread
    produces the rest (:func:`thread_prefetch`). The items and their order are the same either
    way.
    """
    budget = PAYS_SECONDS * PROBE_BATCHES
    iterator = iter(items)
    clock = time.perf_counter
    producing = using = 0.0
    counted = 0
    while True:
        start = clock()
        try:
            item = next(iterator)
        except StopIteration:
            return
        handed = clock()
        producing += handed - start
        yield item
        using += clock() - handed
        counted += 1
        if counted == PROBE_BATCHES:
            if min(producing, using) > budget:
                break  # from now on the thread produces items while the caller uses them
            producing = using = 0.0
            counted = 0
    yield from thread_prefetch(iterator, depth)


def thread_prefetch(items: Iterable[T], depth: int) -> Generator[T, None, None]:
    """Iterate ``items`` while a daemon thread produces up to ``depth`` of them ahead.

    An exception in the producer is re-raised in the consumer. Stopping early (``break`` or
    garbage collection of the generator) stops the producer.
    """
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((True, _DONE))
        except BaseException as error:  # handed to the consumer
            slots.put((False, error))

    thread = threading.Thread(target=produce, name="batchfit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()


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
