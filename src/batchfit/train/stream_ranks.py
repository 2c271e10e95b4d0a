"""Several ranks on one stream: each reads its own events, every step trains on the union of their batches.

Each rank's source is one consumer of a shared group (for Redis: one consumer name per rank), so the
ranks read disjoint events. Before each step the ranks agree, in one small all-reduce, on what each
holds; the batch closes for all of them at once when together they hold ``batch_size`` events, when the
oldest event any of them holds is ``max_latency`` old, or when every stream has ended. Each rank then
contributes its share (evenly split first, the rest taken in rank order from ranks that hold more), so
the global batch has exactly the size one process would have cut, and the step is that of one process
on the union: every rank weights its loss by its share of the global size, and the gradients are summed
over ranks in one all-reduce (:func:`grad_reducer`, which :class:`~batchfit.core.step.Step` runs as its
``reduce_grads``), which also carries the loss and the prequential metric sums. A rank with no
event in a step contributes zeros.

The model is not run through ``DistributedDataParallel`` here: a rank may have nothing to put through
forward and backward in a step, which DDP cannot express; the gradients are reduced explicitly instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.step import ReduceGrads
from ..data.streams import TICK_SECONDS, StreamBatch, StreamSource
from ..distributed import DistContext

# How long a rank waits for events between two agreements: a rank that holds nothing must not keep the
# others (whose batches are ready) waiting long.
RANK_TICK_SECONDS = 0.02


@dataclass(frozen=True)
class StepPlan:
    """What every rank learnt, identically, in the agreement before a step."""

    sizes: tuple[int, ...]  # events each rank puts into this step's batch (all 0: no step now)
    ended: bool  # every rank's stream has ended and no rank holds an event: the run is over
    stop: bool  # some rank asked to stop (callback, budget, until)
    signal: bool  # some rank received SIGTERM/SIGINT

    @property
    def global_size(self) -> int:
        """The batch's size: the sum of the ranks' contributions."""
        return sum(self.sizes)


def shares(batch_size: int, world_size: int) -> list[int]:
    """``batch_size`` split as evenly as possible over ranks (the first ranks take one more)."""
    return [batch_size // world_size + (rank < batch_size % world_size) for rank in range(world_size)]


def allocate(held: Sequence[int], batch_size: int) -> list[int]:
    """How many events each rank contributes to a batch of at most ``batch_size`` when rank ``r`` holds ``held[r]``.

    Each rank first gives up to its even share; what is still missing comes, in rank order, from
    ranks that hold more than their share.
    """
    taken = [min(h, s) for h, s in zip(held, shares(batch_size, len(held)))]
    missing = batch_size - sum(taken)
    for rank, count in enumerate(held):
        extra = min(count - taken[rank], missing)
        if extra > 0:
            taken[rank] += extra
            missing -= extra
    return taken


class StreamRanks:
    """The agreement of a distributed stream run: before each step, who contributes how many events."""

    def __init__(self, context: DistContext, source: StreamSource, batch_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.context, self.source, self.batch_size = context, source, batch_size
        self.device = torch.device(device)  # where the agreement's numbers travel (nccl: a CUDA device)
        self.share = shares(batch_size, context.world_size)[context.rank]
        # A rank reads about its share at a time, so that one rank does not take every event of a slow stream.
        source.read_ahead = max(1, self.share)
        self.others_ended = False  # once a stream has ended, the others fill whole batches by themselves
        latency = source.max_latency
        self.tick = RANK_TICK_SECONDS if latency is None else min(TICK_SECONDS, RANK_TICK_SECONDS, latency)

    def plan(self, stop: bool, signal: bool) -> StepPlan:
        """Read for at most a tick, then agree with the other ranks (one all-reduce of ``2 * world + 3`` numbers)."""
        source, world, rank = self.source, self.context.world_size, self.context.rank
        source.fill(self.batch_size if self.others_ended else self.share, self.tick)
        values = torch.zeros(2 * world + 3, dtype=torch.float64)
        values[rank] = source.buffered
        values[world + rank] = source.age()
        values[2 * world] = float(source.ended)
        values[2 * world + 1] = float(stop)
        values[2 * world + 2] = float(signal)
        values = self.context.all_reduce_sum(values.to(self.device)).cpu()
        held = [int(v) for v in values[:world].tolist()]
        oldest = float(values[world : 2 * world].max())
        ended = int(values[2 * world]) == world
        self.others_ended = bool(values[2 * world] > 0)
        latency = source.max_latency
        close = sum(held) >= self.batch_size or ended or latency is not None and oldest >= latency and sum(held) > 0
        sizes = tuple(allocate(held, self.batch_size)) if close else (0,) * world
        return StepPlan(sizes, ended and sum(held) == 0, bool(values[2 * world + 1] > 0),
                        bool(values[2 * world + 2] > 0))

    def take(self, plan: StepPlan) -> StreamBatch | None:
        """This rank's part of the planned batch (``None`` when it contributes nothing)."""
        count = plan.sizes[self.context.rank]
        if count == 0:
            self.source.last_batch = None
            return None
        reason = "size" if plan.global_size >= self.batch_size else "end" if self.source.ended else "latency"
        return self.source.cut(count, reason)


def grad_reducer(context: DistContext, sparse: Sequence[bool]) -> ReduceGrads:
    """What sums a step's gradients over ranks for :class:`~batchfit.core.step.Step` (its ``reduce_grads``).

    The gradients are averaged over ranks (as DDP does) and the step's ``numbers`` summed, in one
    all-reduce of float64 values (exact for the counts among the numbers). A parameter that has no
    gradient on a rank (that rank had no event) counts as zeros there; one that has none on any rank
    keeps none. ``sparse[i]``: the parameter takes sparse gradients (``nn.Embedding(sparse=True)``); it
    gets back the rows that are not zero.
    """

    def reduce(params: list[torch.nn.Parameter], numbers: list[float]) -> list[float]:
        pieces = [_dense(p) for p in params]
        device = params[0].device if params else torch.device("cpu")
        present = [float(p.grad is not None) for p in params]
        values = torch.cat([*(piece.reshape(-1).to(torch.float64) for piece in pieces),
                            torch.tensor(present + list(numbers), dtype=torch.float64, device=device)])
        context.all_reduce_sum(values)
        sizes = [piece.numel() for piece in pieces]
        tail = values[sum(sizes):].tolist()
        offset = 0
        for index, (param, piece, size) in enumerate(zip(params, pieces, sizes)):
            if tail[index] > 0:  # a gradient on some rank
                grad = (values[offset : offset + size].view_as(piece) / context.world_size).to(param.dtype)
                param.grad = grad.to_sparse(1) if sparse[index] else grad
            offset += size
        return tail[len(params):]

    return reduce


def _dense(param: torch.nn.Parameter) -> torch.Tensor:
    grad = param.grad
    if grad is None:
        return torch.zeros_like(param, memory_format=torch.contiguous_format)
    return grad.to_dense() if grad.is_sparse else grad


def sparse_parameters(module: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> list[bool]:
    """For each of ``params``: whether it is the weight of an embedding with sparse gradients."""
    sparse_ids = {id(m.weight) for m in module.modules()
                  if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse}
    return [id(p) in sparse_ids for p in params]


def gathered(context: DistContext, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a Python object; for the few ids a checkpoint lists)."""
    import torch.distributed as dist

    found: list[Any] = [None] * context.world_size
    try:
        dist.all_gather_object(found, value)
    except Exception as error:  # a peer died, left or timed out
        raise context.peer_failure(error) from error
    return found


def barrier(context: DistContext) -> None:
    """Wait until every rank comes here (after rank 0 made a checkpoint durable, before the acks)."""
    context.all_equal(0)


def each_rank(states: Sequence[dict[str, Any]], rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """The saved per-rank stream states this rank takes over on resume: ``r % world_size == rank``."""
    return (state for r, state in enumerate(states) if r % world_size == rank)
