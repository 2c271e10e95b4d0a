"""Batches from worker processes through shared buffers that are reused, instead of a new segment each.

A DataLoader worker hands a tensor to the main process by moving it into a new shared-memory
segment: a copy, and a page fault for every page on both sides (13 ms for a batch of 64 float32
images of 112x112, 5 ms for the same in uint8, against 1.7 ms for a tiny tensor; measured on 2
vCPUs). A source that can write a batch into a given array (``gather_into``) and finish it in the
consumer (``finish``) gets a ring of shared slots instead, made once per epoch: the worker writes
the batch's raw form (an image source's ``uint8`` pixels, a quarter of its float32 images) into
its slot and returns only the small rest (labels); the main process finishes the batch from the
slot (converts and normalises it, the copy that frees the slot) and hands the slot back.

The workers outlive the epoch (``persistent_workers``): starting them took 100-200 ms an epoch
here, a quarter of an epoch of 400 images. They are kept only while every epoch is read to its
end; one left early (a batch size that changes, a run that stops) shuts them down, and the next
epoch starts new ones. Their results depend on nothing they keep: a batch is a function of its
indices, the seed and the epoch, which come with it.

Batch ``seq`` (counted over the workers' life) owns slot ``seq % count``. A worker waits until the slot's previous
batch has been finished (``turn[slot] == seq``): the DataLoader keeps at most
``workers * prefetch_factor`` batches in flight, so with ``count`` above that a worker never
waits in practice, but the turn keeps the ring safe whatever the loader does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np
import torch

from ..core.batch import Batch

WAIT_SECONDS = 600.0  # a worker gives up on a slot that is not handed back in this long (the consumer is gone)


class SlotRing:
    """``count`` shared buffers of ``shape`` (``uint8``), each written by one batch at a time in turn."""

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.count = count
        self.buffers = torch.empty((count, *shape), dtype=torch.uint8).share_memory_()
        # turn[k]: the batch allowed to write slot k next; turn[count]: 1 once the consumer has closed the ring
        self.turn = torch.cat([torch.arange(count), torch.zeros(1, dtype=torch.int64)]).share_memory_()

    def acquire(self, seq: int) -> np.ndarray:
        """The buffer of batch ``seq``, once the batch before it in the slot has been finished (worker side)."""
        turn, slot = self.turn.numpy(), seq % self.count
        deadline, pause = None, 1e-5
        while turn[slot] != seq:
            if turn[self.count]:
                raise RuntimeError("the batcher stopped reading batches")
            now = time.monotonic()
            deadline = deadline or now + WAIT_SECONDS
            if now > deadline:
                raise RuntimeError(f"batch {seq} waited {WAIT_SECONDS:.0f} s for its shared buffer")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        return self.buffers[slot].numpy()

    def release(self, seq: int) -> None:
        """Batch ``seq`` is finished: its slot goes to batch ``seq + count``."""
        self.turn[seq % self.count] = seq + self.count

    def close(self) -> None:
        """No more batches will be finished: workers still waiting for a slot stop."""
        self.turn[self.count] = 1


class FillInWorker(torch.utils.data.Dataset):
    """A source whose batches are written into a :class:`SlotRing` by DataLoader workers.

    An item is ``(indices, seq, seed, epoch)``; the worker writes the batch into slot ``seq`` with
    ``gather_into(indices, out, seed=seed, epoch=epoch)`` and returns ``(seq, rest)``, where
    ``rest`` is what ``gather_into`` returned (labels, as a NumPy array: sent by value, not
    through a new segment).
    """

    def __init__(self, gather_into: Callable[..., Any], ring: SlotRing) -> None:
        self.gather_into, self.ring = gather_into, ring

    def __len__(self) -> int:  # items come from the sampler, never by position
        return 0

    def __getitem__(self, item: tuple[np.ndarray, int, int, int]) -> tuple[int, Any]:
        indices, seq, seed, epoch = item
        return seq, self.gather_into(indices, self.ring.acquire(seq), seed=seed, epoch=epoch)


class _Items:
    """The sampler of a persistent loader: the items of the epoch being read, replaced each epoch."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class SlotLoader:
    """Worker processes that write a source's batches into a :class:`SlotRing`, kept from epoch to epoch.

    ``gather_into(indices, out, seed=, epoch=)`` runs in the workers. A Batcher makes a new
    loader where this one does not :meth:`fits` the next epoch, or is :attr:`broken` (an epoch
    was left before its end).
    """

    def __init__(self, gather_into: Callable[..., Any], shape: tuple[int, ...], workers: int, depth: int,
                 generator: torch.Generator) -> None:
        self.shape, self.workers, self.depth = shape, workers, depth
        self.ring = SlotRing(workers * depth + 2, shape)
        self.items = _Items()
        self.loader = torch.utils.data.DataLoader(
            FillInWorker(gather_into, self.ring), batch_size=None, sampler=self.items, num_workers=workers,
            prefetch_factor=depth, persistent_workers=True, generator=generator, collate_fn=as_is)
        self.next_seq = 0
        self.broken = False

    def fits(self, shape: tuple[int, ...], workers: int, depth: int) -> bool:
        """Whether these workers serve batches needing buffers of ``shape`` (as many samples or fewer)."""
        return (not self.broken and workers == self.workers and depth == self.depth
                and shape[1:] == self.shape[1:] and shape[0] <= self.shape[0])

    def batches(self, plan: list[tuple[int, int, np.ndarray]], seed: int, epoch: int,
                finish: Callable[[np.ndarray, Any], Batch]) -> Generator[tuple[int, int, Batch], None, None]:
        """``(end, size, batch)`` of the planned ``(end, size, indices)``, gathered by the workers and
        finished here with ``finish(pixels, rest)``."""
        start = self.next_seq
        self.next_seq += len(plan)
        self.items.items = [(indices, start + i, seed, epoch) for i, (_, _, indices) in enumerate(plan)]
        ended = False
        try:
            for (end, size, indices), (seq, rest) in zip(plan, self.loader, strict=True):
                try:  # the batch made from the slot is a copy: the slot goes to the next batch at once
                    batch = finish(self.ring.buffers[seq % self.ring.count].numpy()[: len(indices)], rest)
                finally:
                    self.ring.release(seq)
                yield end, size, batch
            ended = True
        finally:
            if not ended:  # batches in flight hold slots that are never finished: start afresh next time
                self.close()

    def close(self) -> None:
        """Stop the workers (they stop with the loader's iterator); a closed loader is not used again."""
        self.broken = True
        self.ring.close()
        self.loader = None  # type: ignore[assignment]


def as_is(item: Any) -> Any:
    """The DataLoader's ``collate_fn`` for these items: NumPy arrays stay arrays (sent by value, where
    the default would make tensors, each sent through a new shared segment)."""
    return item

