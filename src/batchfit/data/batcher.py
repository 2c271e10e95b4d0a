"""The Batcher: divides a source into mini-batches, epoch after epoch."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Generator, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import InputError, check_choice, check_positive_int, check_seed, expected
from .order import SHUFFLES, epoch_order
from .prefetch import prefetch_iter
from .sources import Batch, Source, as_source, slice_batch, source_lengths
from .worker_slots import SlotLoader


class Position(NamedTuple):
    """Where a batch leaves its batcher: the epoch, the samples served in it with this batch, and
    the batch's global size (the weight of its loss)."""

    epoch: int
    samples_done: int
    batch_size: int


class Batcher:
    """Mini-batches of a source, gathered whole by vectorised indexing.

    ``batch_size`` counts the samples of one batch across all ranks; rank ``rank`` of
    ``world_size`` receives its contiguous share of every batch, so the union over ranks is
    exactly the batch a single process would see. The order is a pure function of
    ``(seed, epoch)``. The position inside an epoch is counted in samples, so
    :meth:`state_dict` / :meth:`load_state_dict` restore it exactly, even when the batch
    size changes between batches (adaptive batch sizes).

    Iterating yields the batches left in the current epoch and then moves to the next epoch.
    ``prefetch=k`` gathers up to ``k`` batches ahead in a background thread where that pays:
    once gathering a batch and using it each take longer than the thread's hand-over costs
    (:func:`~batchfit.data.prefetch.prefetch_iter`), as for shards on a cold page cache or a
    costly transform; batches from memory stay in the caller's thread. ``transform`` is applied
    to whole batches (vectorised augmentation), in that thread when prefetching.
    ``workers=n`` gathers (and transforms) whole batches in ``n`` worker processes instead, for
    sources whose samples are costly to decode; PyTorch's DataLoader runs the workers, one
    call per batch, in order.
    """

    def __init__(
        self,
        src: Any,
        batch_size: int = 64,
        shuffle: bool | str = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        pin_memory: bool = False,
        prefetch: int = 0,
        transform: Callable[[Batch], Batch] | None = None,
        workers: int = 0,
        block_size: int = 512,
        window_blocks: int = 16,
        batch_tokens: int | None = None,
    ) -> None:
        self.src: Source = as_source(src, "src")
        self.num_samples = len(self.src)
        check_choice("shuffle", shuffle, SHUFFLES)
        if not isinstance(drop_last, bool):
            raise expected("drop_last", "True or False", drop_last)
        check_seed(seed)
        check_positive_int("world_size", world_size)
        check_positive_int("rank", rank, allow_zero=True)
        if rank >= world_size:
            raise expected("rank", f"smaller than world_size={world_size}", rank)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.pin_memory = pin_memory
        self.prefetch = check_positive_int("prefetch", prefetch, allow_zero=True)
        self.transform = transform
        self.workers = check_positive_int("workers", workers, allow_zero=True)
        self.block_size = check_positive_int("block_size", block_size)
        self.window_blocks = check_positive_int("window_blocks", window_blocks)
        self.batch_tokens = None if batch_tokens is None else check_positive_int("batch_tokens", batch_tokens)
        if batch_tokens is not None and drop_last:
            raise expected("drop_last", "False with batch_tokens (batches of tokens have no full size to drop "
                           "a smaller last one by)", drop_last)
        self._lengths = source_lengths(self.src) if shuffle == "length" or batch_tokens is not None else None
        if self._lengths is None and batch_tokens is not None:
            raise expected("batch_tokens", "None unless the source has variable-length arrays (NAME_lengths) "
                           "to count tokens by", batch_tokens)
        self._length_batch = batch_size  # the batch size length-grouped windows are cut for
        self.batch_size = batch_size  # validated by the setter
        self.epoch = 0
        self.samples_done = 0  # position inside the current epoch
        self.last_batch_size = 0  # global size of the batch yielded last
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        self._slots: SlotLoader | None = None  # worker processes kept from epoch to epoch (workers=n, slot sources)

    @property
    def batch_size(self) -> int:
        """Samples per batch across all ranks; may be changed between batches."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        check_positive_int("batch_size", value)
        if self.drop_last and value > self.num_samples:
            raise expected(
                "batch_size",
                f"at most the number of samples ({self.num_samples}) when drop_last=True",
                value,
            )
        self._batch_size = value

    def __len__(self) -> int:
        """Batches in a whole epoch at the current batch size (token budget)."""
        if self.batch_tokens is not None:
            return sum(1 for _ in self._sizes(0))
        if self.drop_last:
            return self.num_samples // self._batch_size
        return -(-self.num_samples // self._batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (shard files are checked for a change of size first)."""
        self.epoch = check_positive_int("epoch", epoch, allow_zero=True)
        self.samples_done = 0
        check_sizes = getattr(self.src, "check_sizes", None)
        if check_sizes is not None:
            check_sizes()

    def order(self) -> np.ndarray:
        """The sample indices of the current epoch, in the order they are served."""
        if self._order_epoch != self.epoch:
            self._order = epoch_order(
                self.num_samples, self.shuffle, self.seed, self.epoch, self.block_size, self.window_blocks,
                self._lengths, self._length_batch,
            )
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def rank_slice(self, size: int) -> tuple[int, int]:
        """The ``[lo, hi)`` offsets of this rank's share of a batch of ``size`` samples."""
        base, extra = divmod(size, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def _plan(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(end position, global size, this rank's indices) for each batch left in the epoch."""
        order = self.order()
        for position, size in self._sizes(self.samples_done):
            lo, hi = self.rank_slice(size) if self.world_size > 1 else (0, size)
            yield position + size, size, order[position + lo : position + hi]

    def _sizes(self, position: int) -> Iterator[tuple[int, int]]:
        """(start, global size) of each batch of the epoch from ``position`` on.

        With ``batch_tokens`` a batch takes the samples that follow in the epoch's order while
        their count times their longest length (the padded tokens) stays within the budget, at
        least one sample and at most ``batch_size``.
        """
        n = self.num_samples
        order, lengths = (self.order(), self._lengths) if self.batch_tokens is not None else (None, None)
        while position < n:
            size = min(self._batch_size, n - position)
            if order is not None and lengths is not None and self.batch_tokens is not None:
                ahead = lengths[order[position : position + size]]
                padded = np.maximum.accumulate(ahead) * np.arange(1, len(ahead) + 1)
                size = max(1, int(np.searchsorted(padded, self.batch_tokens, side="right")))
            elif self.drop_last and size < self._batch_size:
                return
            yield position, size
            position += size

    def _batches_per_gather(self) -> int:
        """How many planned batches one gather serves: more than one where the source asks (many shards)."""
        ask = getattr(self.src, "batches_per_gather", None)
        return 1 if ask is None or self.workers else max(1, int(ask(max(1, self._batch_size // self.world_size))))

    def _loads(self, per_gather: int) -> Generator[tuple[int, int, Batch], None, None]:
        """(end, size, batch) of the planned batches, ``per_gather`` of them gathered in one call.

        A batch of a source split into many shards touches many of them, at one call each; the
        batches of one gather share those calls and are served as views of it, in order.
        """
        if per_gather == 1:
            gather, transform, pin = self._source_gather(), self.transform, self.pin_memory
            for end, size, indices in self._plan():
                batch = gather(indices, pin)
                yield end, size, batch if transform is None else transform(batch)
            return
        plans = self._plan()
        gather_batches = getattr(self.src, "gather_batches", None)  # the source cuts its gather itself
        while group := list(itertools.islice(plans, per_gather)):
            if gather_batches is not None:
                batches = gather_batches([indices for _, _, indices in group], self.pin_memory)
            else:
                rows = self.src.gather(np.concatenate([indices for _, _, indices in group]), self.pin_memory)
                bounds = [0, *itertools.accumulate(len(indices) for _, _, indices in group)]
                batches = [slice_batch(rows, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
            for (end, size, _), batch in zip(group, batches):
                yield end, size, batch if self.transform is None else self.transform(batch)

    @property
    def epoch_done(self) -> bool:
        """Whether no batch is left in the current epoch (``drop_last`` may leave a remainder)."""
        left = self.num_samples - self.samples_done
        return left == 0 or (self.drop_last and left < self._batch_size)

    def remaining(self) -> Iterator[Batch]:
        """The batches left in the current epoch, without moving to the next epoch afterwards."""
        for batch, _ in self.positioned():
            yield batch

    def positioned(self) -> Iterator[tuple[Batch, Position]]:
        """``(batch, position just after it)`` for the batches left in the current epoch.

        A consumer that runs ahead of its use of the batches (a device copy of the next batch
        while the current one computes) keeps the position of the batch it used and hands it
        back to :meth:`seek` or :meth:`state_dict`, so that a checkpoint never counts a batch
        that was fetched but not trained on.
        """
        epoch = self.epoch
        while (per_gather := self._batches_per_gather()) > 1 or self.prefetch or self.workers:
            # A batch_size change drops the batches gathered ahead at the old size, so what is
            # served next (and what a state_dict taken now restores) does not depend on prefetch.
            batch_size = self._batch_size
            if self.workers:
                queued = self._in_workers()
            else:
                loads = self._loads(per_gather)
                queued = prefetch_iter(loads, self.prefetch) if self.prefetch else loads
            for end, size, batch in queued:
                self.samples_done, self.last_batch_size = end, size
                yield batch, Position(epoch, end, size)
                if self._batch_size != batch_size:
                    queued.close()
                    break
            else:
                return
        gather, transform, pin = self._source_gather(), self.transform, self.pin_memory
        for end, size, indices in self._plan():
            batch = gather(indices, pin)
            if transform is not None:
                batch = transform(batch)
            self.samples_done, self.last_batch_size = end, size
            yield batch, Position(epoch, end, size)

    def seek(self, position: Position) -> None:
        """Continue just after the batch that ``position`` was handed out with."""
        self.epoch, self.samples_done, self.last_batch_size = position

    def _source_gather(self) -> Callable[..., Batch]:
        """The source's gather; a source that augments (``seeded_gather``, as ``bf.images.ImageSource``)
        is also told the seed and epoch, so that its random numbers are a function of (seed, epoch, sample)."""
        gather: Callable[..., Batch] = self.src.gather
        if getattr(self.src, "seeded_gather", False):
            return functools.partial(gather, seed=self.seed, epoch=self.epoch)
        return gather

    def _in_workers(self) -> Generator[tuple[int, int, Batch], None, None]:
        """(end, size, batch) of the planned batches, gathered in worker processes.

        The DataLoader draws its workers' base seed from the generator it is given, else from
        torch's global one, which would shift every later random number of the run (dropout
        masks) each time a loader is built, e.g. once more on resuming mid-epoch. Its generator
        is seeded here from (seed, epoch, position), and each batch's transform runs under a
        torch seed of (seed, epoch, end of the batch), whichever worker takes it.
        """
        plan = list(self._plan())
        if not plan:
            return
        generator = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, self.samples_done))
        depth = max(2, self.prefetch)
        share = -(-self._batch_size // self.world_size)  # a rank's share of a full batch
        shape = self._slot_shape(max(share, *(len(indices) for _, _, indices in plan)))
        if shape is not None:  # the source writes its batches into shared buffers (data/worker_slots.py)
            yield from self._in_slots(plan, shape, depth, generator)
            return
        items = [(indices, batch_seed(self.seed, self.epoch, end)) for end, _, indices in plan]
        loader = torch.utils.data.DataLoader(
            _GatherInWorker(self.src, self.transform, self._source_gather()), batch_size=None, sampler=items,
            num_workers=self.workers, pin_memory=self.pin_memory, prefetch_factor=depth, generator=generator)
        for (end, size, _), batch in zip(plan, loader):
            yield end, size, batch

    def _slot_shape(self, most: int) -> tuple[int, ...] | None:
        """The shape of a shared buffer for batches of at most ``most`` samples, where the source fills
        such buffers (``slot_shape``, ``gather_into``, ``finish``) and no Batcher transform follows."""
        ask = getattr(self.src, "slot_shape", None)
        return None if ask is None or self.transform is not None else ask(most)

    def _in_slots(self, plan: list[tuple[int, int, np.ndarray]], shape: tuple[int, ...], depth: int,
                  generator: torch.Generator) -> Generator[tuple[int, int, Batch], None, None]:
        """(end, size, batch) of the planned batches, written by the workers into reused shared buffers."""
        if self._slots is None or not self._slots.fits(shape, self.workers, depth):
            self.close()
            self._slots = SlotLoader(self.src.gather_into, shape, self.workers, depth, generator)  # type: ignore[attr-defined]
        finish = functools.partial(self.src.finish, pin_memory=self.pin_memory)  # type: ignore[attr-defined]
        yield from self._slots.batches(plan, self.seed, self.epoch, finish)

    def close(self) -> None:
        """Stop the worker processes kept from epoch to epoch (``workers=n`` with an image source), if any.

        Iterating again starts new ones. The Trainer closes its batcher when ``fit`` returns.
        """
        if self._slots is not None:
            self._slots.close()
            self._slots = None

    def __iter__(self) -> Iterator[Batch]:
        if self.epoch_done:
            self.set_epoch(self.epoch + 1)
        yield from self.remaining()
        self.set_epoch(self.epoch + 1)

    def state_dict(self, position: Position | None = None) -> dict[str, Any]:
        """The exact position — epoch and samples served in it — plus what fixes the order.

        ``position`` (from :meth:`positioned`) gives the state just after that batch instead of
        after the last one served.
        """
        epoch, samples_done = (self.epoch, self.samples_done) if position is None else position[:2]
        return {
            "epoch": epoch,
            "samples_done": samples_done,
            "batch_size": self._batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "batch_tokens": self.batch_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the batcher that produced ``state`` stopped."""
        for key in ("seed", "shuffle", "num_samples", "batch_tokens"):
            if state.get(key) != getattr(self, key):
                raise InputError(
                    f"Batcher state was saved with {key}={state[key]!r}, but this Batcher has "
                    f"{key}={getattr(self, key)!r}; the sample order would differ."
                )
        check_positive_int("state['epoch']", state["epoch"], allow_zero=True)
        done = state["samples_done"]
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= self.num_samples:
            raise expected("state['samples_done']", f"a position from 0 to {self.num_samples}", done)
        self.batch_size = state["batch_size"]
        self.epoch = state["epoch"]
        self.samples_done = done
        check_sizes = getattr(self.src, "check_sizes", None)
        if check_sizes is not None:
            check_sizes()  # a shard cut short since it was mapped is named now, not hit as SIGBUS later


def batch_seed(seed: int, epoch: int, samples_done: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, position), for worker processes."""
    state = np.random.SeedSequence([seed, epoch, samples_done]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class _GatherInWorker(torch.utils.data.Dataset):
    """A source seen as a dataset whose items are whole batches, for DataLoader workers.

    An item is ``(indices, seed)``: the transform runs under that torch seed, so that its random
    numbers depend on the batch, not on which worker gathers it or when the loader started.
    """

    def __init__(self, src: Source, transform: Callable[[Batch], Batch] | None,
                 gather: Callable[..., Batch] | None = None) -> None:
        self.src, self.transform = src, transform
        self.gather = src.gather if gather is None else gather

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, item: tuple[np.ndarray, int]) -> Batch:
        indices, seed = item
        batch = self.gather(indices, False)
        if self.transform is None:
            return batch
        torch.manual_seed(seed)  # this worker process's own generator
        return self.transform(batch)
