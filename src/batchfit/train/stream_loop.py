"""Training from a stream of events: batches cut by size or time, test-then-train, ack after a durable checkpoint.

``Trainer.fit(stream)`` runs the trainer's one loop on a :class:`StreamFeed`, which keeps what only a
stream has. Each step, in the order of the algorithm:

1. wait for the next batch (``batch_size`` events, or fewer after ``max_latency`` seconds);
2. score it with the weights that have not seen it (the prequential, test-then-train metrics:
   the step's own forward pass computes the loss before the update; user metrics take one more
   forward pass without gradients);
3. forward, backward and update (:meth:`~batchfit.core.step.Step.step`); a step that raises or whose loss
   is not finite is searched by halves for the events that fail on their own, which are quarantined (the
   dead letters), and runs again on the rest of its batch;
4. every ``checkpoint_every`` steps: write a checkpoint that lists the events it includes, then
   acknowledge them. A crash between the two re-acknowledges them on resume; a crash before the
   checkpoint leaves them pending at the broker, which delivers them again: no event is lost, and
   an event is trained on twice only when its update was lost (at most one checkpoint interval).

Torch lr schedulers step after each update; each ``fit`` call is one epoch for callbacks and per-epoch
schedulers. In a distributed run the ranks agree before each step on their contributions to the batch,
and the step's gradients are averaged over ranks explicitly (:mod:`.stream_ranks`).
``on_nan="rollback"`` is refused: rolling the weights back to a checkpoint would un-train events that
are already acknowledged.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.batch import Batch, forward, forward_loss, param_dtype, target_of, to_device
from ..core.step import ReduceGrads, Step, StepResult
from ..data.streams import IterableEvents, StreamBatch, StreamSource
from ..errors import CheckpointError, InputError, check_positive_int, expected
from ..measure.noise import NoiseScaleTracker
from .metrics import is_stateful
from .options import TrainerOptions
from .progress import Progress
from .stream_ranks import StreamRanks, barrier, each_rank, gathered, grad_reducer, sparse_parameters

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger("batchfit")

# Samples in the window of the windowed prequential metrics.
PREQUENTIAL_WINDOW = 1000
STREAM_RESUME_KEYS = ("batch_size", "optimizer")
# With a checkpoint_dir and neither checkpoint_every nor checkpoint_seconds, a stream checkpoints (and so
# acknowledges) every this many seconds: an endless stream would otherwise never do either.
STREAM_CHECKPOINT_SECONDS = 60.0
# Step rows a stream's history keeps (older ones go to the CSVLogger's metrics.csv before they are dropped).
STREAM_HISTORY_ROWS = 10_000
# Without a checkpoint_dir, events are acknowledged once this many have been trained on (and at the end).
ACK_EVERY = 1024
# max_batch_size="auto": the noise scale is measured every AUTO_EVERY steps (the step's batch halved), averaged
# with AUTO_BETA (about the last 2 / (1 - AUTO_BETA) measurements count); the cap stays at batch_size until
# AUTO_MIN_MEASURES measurements, and is at most batch_size times 2**AUTO_MAX_DOUBLINGS. It follows a lower
# confidence bound of the noise scale, |G|² taken AUTO_Z standard errors high, and rises at most AUTO_GROWTH
# times per measurement (it falls at once).
AUTO_EVERY, AUTO_BETA, AUTO_MIN_MEASURES, AUTO_MAX_DOUBLINGS = 8, 0.995, 25, 10
AUTO_Z, AUTO_GROWTH = 2.0, 2


class _Running:
    """One metric's running sums: over the whole run, and over the newest ``window`` samples."""

    __slots__ = ("whole", "windowed", "total", "count", "recent", "recent_total", "recent_count")

    def __init__(self, name: str, total: float = 0.0, count: int = 0) -> None:
        self.whole, self.windowed = f"preq_{name}", f"preq_{name}_window"  # its two column names
        self.total, self.count = total, count
        self.recent: collections.deque[tuple[float, int]] = collections.deque()
        self.recent_total, self.recent_count = 0.0, 0


# What a step of the loss alone, none of whose events was delivered before, scored: no metric, none redelivered.
NO_SCORES: tuple[dict[str, float], dict[str, float], int] = ({}, {}, 0)


class Prequential:
    """Sample-weighted running means of per-batch metrics, over the whole run and over a recent window."""

    def __init__(self, window: int = PREQUENTIAL_WINDOW) -> None:
        self.window = window
        self.runs: dict[str, _Running] = {}

    def add(self, name: str, value: float, size: int) -> None:
        """Fold one batch's mean ``value`` over ``size`` samples in."""
        run = self.runs.get(name)
        if run is None:
            run = self.runs[name] = _Running(name)
        weighted = value * size
        run.total += weighted
        run.count += size
        recent = run.recent
        recent.append((weighted, size))
        run.recent_total += weighted
        run.recent_count += size
        window = self.window
        while run.recent_count - recent[0][1] >= window:
            dropped, count = recent.popleft()
            run.recent_total -= dropped
            run.recent_count -= count

    def into(self, found: dict[str, float]) -> dict[str, float]:
        """:meth:`columns`, written into ``found`` (returned)."""
        for run in self.runs.values():
            found[run.whole] = run.total / run.count if run.count else math.nan
            # Empty after a resume until the next batch: a restart with nothing new to read has no window.
            found[run.windowed] = run.recent_total / run.recent_count if run.recent_count else math.nan
        return found

    def columns(self) -> dict[str, float]:
        """``preq_<name>`` (the mean over every sample so far) and ``preq_<name>_window`` (the last samples)."""
        return self.into({})

    def state_dict(self) -> dict[str, Any]:
        """Sums and counts (the window starts empty again after a resume)."""
        runs = self.runs
        return {"sums": {k: r.total for k, r in runs.items()}, "counts": {k: r.count for k, r in runs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.runs = {k: _Running(k, float(v), int(state["counts"][k])) for k, v in state["sums"].items()}


def check_until(until: Any) -> None:
    """Refuse anything but ``None``, a positive number of seconds or a callable ``until(trainer) -> bool``."""
    if until is None or callable(until):
        return
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not until > 0:
        raise expected("until", "None, a positive number of seconds, or a callable until(trainer) -> bool", until)


def check_stream_fit(options: TrainerOptions, max_steps: Any, until: Any) -> None:
    """Refuse what a stream cannot do, before anything starts."""
    if not isinstance(options.batch_size, int):
        raise expected("batch_size", "a positive integer when training from a stream (events per update; "
                       "'full', 'auto' and 'adaptive' need a dataset of known size)", options.batch_size)
    if options.micro_batch_size == "auto":
        raise expected("micro_batch_size", "an integer or None when training from a stream", "auto")
    if options.on_nan == "rollback":
        raise expected("on_nan", "'raise' or 'skip' when training from a stream (a rollback would un-train "
                       "events that are already acknowledged)", "rollback")
    if max_steps is not None:
        check_positive_int("max_steps", max_steps)
    check_until(until)


@dataclasses.dataclass
class Closed:
    """A stream batch as the loop sees it: its size over all ranks (the broker keeps the position); smaller
    after the step when poison events were taken out of it."""

    batch_size: int


class StreamFeed:
    """One pass of the trainer's loop over ``source``: until it ends, ``max_steps`` steps, ``until`` or a signal.

    In a distributed run each rank passes its own source (one consumer of a shared group, e.g. a
    :class:`~batchfit.RedisStream` with a consumer name per rank), and each step trains on the union of
    the ranks' batches (:mod:`.stream_ranks`).
    """

    open_ended = True
    resume_keys = STREAM_RESUME_KEYS

    def __init__(self, trainer: Trainer, source: StreamSource, max_steps: int | None, until: Any,
                 resume: bool) -> None:
        o, dist = trainer.options, trainer.dist
        assert isinstance(o.batch_size, int)
        self.trainer, self.source, self.batch_size, self.until = trainer, source, o.batch_size, until
        self.max_steps, self.resume = max_steps, resume
        self.epoch = len(trainer.history.epochs) + 1  # this fit's number: what callbacks and schedulers see
        self.included: list[Any] = []  # ids trained on since the last ack
        self.redelivered = 0  # events trained on that had been delivered before (all ranks)
        # Events quarantined in this run (this rank): the count a checkpoint restored, plus the source's since.
        dead = trainer.history.column("dead_letters") if "dead_letters" in trainer.history.columns() else []
        self.dead_before = int(dead[-1]) if dead and not math.isnan(dead[-1]) else 0
        self.dead_mark = source.quarantined
        self.mark: Closed | None = None  # of the batch being trained
        self.size = o.batch_size  # events asked for the next batch: grows past batch_size to catch up (max_batch_size)
        # max_batch_size="auto": the stream's own noise scale, which bounds the catch-up batch.
        self.noise = NoiseScaleTracker(AUTO_BETA) if source.max_batch_size == "auto" else None
        self.cap = o.batch_size  # max_batch_size="auto": the cap in force (_update_cap sets it)
        if trainer.history.keep is None:
            trainer.history.keep = STREAM_HISTORY_ROWS
        self.fit_loss = [0.0, 0]  # this fit's prequential loss: the sum over its events, and their number
        self.prequential = Prequential()
        self.ranks: StreamRanks | None = None  # a distributed run's agreement
        self.rank_states: list[dict[str, Any]] = []  # distributed: every rank's consumer state, for the checkpoint
        self.passed = False  # this fit's one pass is over
        self.start_step = self.end_step = 0
        self.deadline: float | None = None
        self.scored: tuple[dict[str, float], dict[str, float], int] = ({}, {}, 0)  # of the step being trained
        micro = o.micro_batch_size if isinstance(o.micro_batch_size, int) else None
        # Distributed: the plain module, whose gradients are summed over ranks after the backward passes (a rank
        # may have no event in a step, which DDP cannot express); the loss is weighted as DDP would need it.
        trainer.step_fn = self.step_fn = Step(
            trainer.module if dist.enabled else trainer.model, trainer.loss_fn, trainer.optimizer,
            device=trainer.device, precision=o.precision, micro_batch_size=micro, max_grad_norm=o.max_grad_norm,
            world_size=dist.world_size, loss_count=trainer.loss_count)
        # Distributed: whether this rank entered the step's collective (the gradients' all-reduce) in the current
        # attempt, and the first line of the exception a rank's step raised in it (see _ranks_attempt).
        self.reduced = False
        self.failure: str | None = None
        self.reducer: ReduceGrads | None = None
        if dist.enabled:
            self.ranks = StreamRanks(dist, source, o.batch_size, trainer.device)
            self.reducer = grad_reducer(dist, sparse_parameters(trainer.module, self.step_fn.params))
            self.step_fn.reduce_grads = self._reduce_grads
        # What floating inputs are cast to, found once (a walk over the parameters each step costs microseconds).
        self.dtype = param_dtype(trainer.module)
        source.float_dtype = self.dtype  # floating fields cast once per read of the source, not per batch
        # On the CPU a batch cut from the source is the model's already (its floats cast as they were read): no
        # to_device per step.
        self.ready = trainer.device.type == "cpu"
        self.timed = isinstance(until, (int, float))  # a budget in seconds (else None or a callable)
        # The user's metrics of one batch, summed over ranks (stateful ones accumulate on each rank).
        self.shared_metrics = [name for name, metric in trainer.evaluator.metrics.items() if not is_stateful(metric)]

    def start_fresh(self) -> None:
        pass

    def more(self) -> bool:
        return not self.passed

    def nothing_left(self) -> str | None:
        return None

    def start_epoch(self, progress: Progress, now: float) -> int:
        trainer = self.trainer
        trainer.lr.begin(self.batch_size)
        trainer.lr.apply(trainer.step, self.batch_size)
        self.start_step = trainer.step
        if self.max_steps is not None:
            self.end_step = self.max_steps if self.resume else trainer.step + self.max_steps
        self.deadline = now + self.until if isinstance(self.until, (int, float)) else None
        # An open-ended stream has no total (0: the bar counts steps without one).
        progress.start_epoch(self.epoch, self.epoch, 0 if self.max_steps is None else self.end_step - self.start_step,
                             0, now)
        return 0

    def batches(self) -> Iterator[tuple[StreamBatch | None, Closed]]:
        """Close the next batch (this rank's part of it: ``None`` when it holds no event of the step)."""
        trainer = self.trainer
        if self.ranks is None:
            yield from self._local_batches()
            return
        while self.max_steps is None or trainer.step < self.end_step:
            budget = self._budget_spent()
            plan = self.ranks.plan(trainer.stop_training or budget, trainer.signals.received is not None)
            if plan.signal:  # every rank learns it at the same step: all checkpoint together and stop
                trainer.note_signal(True)
                return
            if plan.stop or plan.ended:
                return
            if plan.global_size > 0:
                self.mark = Closed(plan.global_size)
                yield self.ranks.take(plan), self.mark

    def _local_batches(self) -> Iterator[tuple[StreamBatch, Closed]]:
        """:meth:`batches` of one process (what is asked each step hoisted out of the loop)."""
        trainer, source, signals = self.trainer, self.source, self.trainer.signals
        end_step = math.inf if self.max_steps is None else self.end_step
        fixed = source.max_batch_size is None or source.max_latency is None  # every batch asks for batch_size
        size, budget, next_batch = self.batch_size, self.until is not None, source.next_batch
        while trainer.step < end_step:
            if signals.received is not None or trainer.stop_training or budget and self._budget_spent():
                return
            local = next_batch(size if fixed else self._next_size())
            if local is None:
                if source.ended:
                    return
                continue  # an idle tick: look at signals and budgets again
            self.mark = mark = Closed(local.size)
            yield local, mark

    def _next_size(self) -> int:
        """The next batch's size: ``batch_size``, or while the oldest buffered event is older than ``max_latency``
        (the trainer has fallen behind), twice the last, up to the source's ``max_batch_size``; halved back once the
        lag is under ``max_latency``."""
        source = self.source
        cap = self.cap if self.noise is not None else source.max_batch_size  # auto: set by _update_cap
        if cap is None or source.max_latency is None:
            return self.batch_size
        assert isinstance(cap, int)
        if source.lag() > source.max_latency:
            self.size = min(max(cap, self.batch_size), self.size * 2)
        else:
            self.size = max(self.batch_size, self.size // 2)
        return self.size

    def _update_cap(self) -> None:
        """After a measurement: ``batch_size`` times the largest power of two (at most ``2**AUTO_MAX_DOUBLINGS``)
        at or under a lower confidence bound of the simple noise scale (``|G|²`` taken ``AUTO_Z`` standard errors
        high: :meth:`~batchfit.measure.noise.NoiseScaleTracker.b_simple_lower`), and at most ``AUTO_GROWTH`` times
        the cap before; ``batch_size`` before ``AUTO_MIN_MEASURES`` measurements and while the bound is not
        defined (``|G|²`` still lost in the noise of the measurements: no evidence that a larger batch learns).

        The ratio of the averages alone swings by factors of ten between draws of the same stream where the
        averaged ``|G|²`` is within a few standard errors of zero; the bound does not, and errs small."""
        assert self.noise is not None
        target = self.batch_size
        if self.noise.count >= AUTO_MIN_MEASURES:
            ratio = self.noise.b_simple_lower(AUTO_Z) / self.batch_size
            if ratio >= 2:
                target = self.batch_size << min(AUTO_MAX_DOUBLINGS, int(math.log2(ratio)))
        self.cap = min(target, self.cap * AUTO_GROWTH)

    def _train(self, batch: Batch, size: int) -> StepResult:
        """The step on ``batch``; with ``max_batch_size="auto"``, every ``AUTO_EVERY`` steps the batch's two halves
        give one measurement of the noise scale (the same update, the gradient summed from the halves). Not while
        catching up (the batch past ``batch_size``): the cap measured before holds, and catching up costs nothing."""
        if self.noise is None or size < 2 or self.trainer.step % AUTO_EVERY or self.size > self.batch_size:
            return self.step_fn.step(batch, size)
        result = self.step_fn.step(batch, size, measure_noise=True)
        if result.noise is not None and result.grad_sq is not None and result.noise.b_small < size:
            self.noise.update(result.noise.small_sq, result.grad_sq, result.noise.b_small, size)
            self._update_cap()
        return result

    def _budget_spent(self) -> bool:
        until = self.until
        if self.deadline is not None:
            return time.perf_counter() >= self.deadline
        return callable(until) and bool(until(self.trainer))

    def lr_batch_size(self, size: int) -> int:
        return size

    def step(self, local: StreamBatch | None, size: int, stop_requested: bool) -> StepResult:
        """Score this rank's events with the current weights, then train on the step's batch.

        One process: when the step fails (an exception, or a non-finite loss), the batch is searched by halves
        for the events that fail on their own (:meth:`_find_poison`); they are quarantined and the step runs
        again on the rest. A batch that fails although none of its events does on its own (the weights
        diverged) goes to the non-finite loss policy: ``on_nan="raise"`` raises (its events stay pending,
        delivered again after a restart), ``on_nan="skip"`` quarantines every event of it.
        """
        if self.ranks is not None:
            return self._ranks_step(local, size)
        assert local is not None and self.mark is not None
        if local.quarantined:
            self.included += local.quarantined  # quarantined as they arrived: acknowledged with this batch
            local.quarantined = []
        failure: BaseException | None = None
        try:
            result = self._attempt(local, size)
            if result.value is None or math.isfinite(result.value):
                self.included += local.ids
                return result
        except (IndexError, RuntimeError) as error:
            self.step_fn.skip()
            failure = error
        poison = self._find_poison(local)
        if poison:
            self._take_out(local, poison)
            if not local.size:
                return StepResult(0.0, empty=True)
            return self.step(local, local.size, stop_requested)
        if failure is not None:
            raise InputError(f"step {self.trainer.step + 1} (events {local.ids[0]!r} to {local.ids[-1]!r}): "
                                f"{str(failure).strip().splitlines()[0]}") from failure
        if self.trainer.options.on_nan == "skip":
            self._take_out(local, {i: f"the loss of its batch (step {self.trainer.step + 1}) is {result.value}, "
                                      f"though no event's is on its own; on_nan='skip' quarantined the batch"
                                   for i in range(local.size)}, shrink=False)
        return result

    def _attempt(self, local: StreamBatch, size: int) -> StepResult:
        """Forward, backward and (for a finite loss) update on ``local``; its prequential scores for the history."""
        trainer = self.trainer
        batch = local.batch if self.ready else to_device(local.batch, trainer.device, self.dtype)
        if not trainer.evaluator.metrics:  # the loss alone: the step's own forward pass scores the batch
            result = self._train(batch, size)
            self.scored = NO_SCORES if not local.redelivered else ({}, {}, local.redelivered)
            return result
        output = _eval_output(trainer, batch)  # with the weights that have not seen the batch
        result = self._train(batch, size)  # the loss is computed before the update: a test-then-train score
        if result.value is None or math.isfinite(result.value):
            scores, running = _prequential_metrics(trainer, output, target_of(batch))
            self.scored = (scores, running, local.redelivered)
        return result

    def _find_poison(self, local: StreamBatch) -> dict[int, str]:
        """The events of ``local`` whose loss alone raises or is not finite (with the current weights, in eval mode,
        without gradients), found by halving the batch; none when the weights themselves are not finite or
        every event of a batch of several fails (then the model is at fault, not the events)."""
        trainer = self.trainer
        if not all(torch.isfinite(p).all() for p in trainer.module.parameters()):
            return {}
        batch = to_device(local.batch, trainer.device, self.dtype)
        found: dict[int, str] = {}

        def failing(rows: list[int]) -> str | None:
            index = torch.tensor(rows, device=trainer.device)
            part = {k: v.index_select(0, index) for k, v in batch.items()} if isinstance(batch, dict) else tuple(
                v.index_select(0, index) for v in batch)
            try:
                loss, _ = forward_loss(trainer.module, trainer.loss_fn, part)
                value = float(loss)
            except (IndexError, RuntimeError, ValueError) as error:
                text = str(error).strip()
                return f"the model raised {type(error).__name__}: {text.splitlines()[0] if text else ''}"
            return None if math.isfinite(value) else f"its loss alone is {value}"

        def search(rows: list[int], why: str) -> None:
            if len(rows) == 1:
                found[rows[0]] = why
                return
            for part in (rows[: len(rows) // 2], rows[len(rows) // 2 :]):
                reason = failing(part)
                if reason is not None:
                    search(part, reason)

        trainer.module.eval()
        try:
            with torch.no_grad():
                rows = list(range(local.size))
                reason = failing(rows)
                if reason is not None:
                    search(rows, reason)
        finally:
            trainer.module.train()
        if len(found) == local.size > 1:
            return {}
        return found

    def _take_out(self, local: StreamBatch, poison: dict[int, str], shrink: bool = True) -> None:
        """Quarantine the events ``poison`` names (index -> reason) and, with ``shrink``, take them out of ``local``."""
        rows = sorted(poison)
        step = self.trainer.step + 1
        self.source.quarantine([local.event(i) for i in rows],  # a plain iterable's rebuilt from the columns
                               [f"{poison[i]} (step {step})" for i in rows])
        self.included += [local.ids[i] for i in rows]
        if not shrink:
            self.included += [i for r, i in enumerate(local.ids) if r not in poison]
            return
        keep = [r for r in range(local.size) if r not in poison]
        index = torch.tensor(keep, dtype=torch.long)
        batch = local.batch
        local.batch = {k: v.index_select(0, index) for k, v in batch.items()} if isinstance(batch, dict) else tuple(
            v.index_select(0, index) for v in batch)
        local.ids = [local.ids[r] for r in keep]
        local.times = [local.times[r] for r in keep]
        local.oldest_time = None
        if local.events:
            local.events = [local.events[r] for r in keep]
            local.redelivered = sum(e.redelivered for e in local.events)
        local.size = len(keep)
        if self.ranks is None:  # a distributed step's size is agreed by the ranks (see _ranks_step)
            assert self.mark is not None
            self.mark.batch_size = local.size

    def _ranks_step(self, local: StreamBatch | None, size: int) -> StepResult:
        """A distributed step. When it fails on some rank (its loss over all ranks is not finite, or a rank's part
        raised before the gradients' all-reduce), every rank searches its own events for poison, the ranks agree
        on what they found, and run the step again on what they have left; when no rank finds any, a step that
        raised raises on every rank, and a non-finite loss goes to the ``on_nan`` policy, as in one process."""
        assert self.mark is not None
        if local is not None:
            self.included += local.quarantined  # quarantined as they arrived: acknowledged with this batch
            local.quarantined = []
        result = self._ranks_attempt(local, size)
        if result.value is None or math.isfinite(result.value):
            if local is not None:
                self.included += local.ids
            return result
        poison = self._find_poison(local) if local is not None and local.size else {}
        if poison:
            assert local is not None
            self._take_out(local, poison)
        # Every rank learns the same: how many events are left, how many were poison, what raised (if anything).
        agreed = gathered(self.trainer.dist, [0 if local is None else local.size, len(poison), self.failure])
        left, found = sum(a for a, _, _ in agreed), sum(b for _, b, _ in agreed)
        failures = [(rank, text) for rank, (_, _, text) in enumerate(agreed) if text is not None]
        self.failure = None
        if found:
            self.mark.batch_size = left
            if not left:
                return StepResult(0.0, empty=True)
            return self._ranks_step(local if local is not None and local.size else None, left)
        if failures:
            rank, text = failures[0]
            where = "" if local is None or not local.size else f" (events {local.ids[0]!r} to {local.ids[-1]!r})"
            raise InputError(f"step {self.trainer.step + 1}{where}: rank {rank} raised {text}; no event of the "
                             f"step fails on its own")
        if local is not None and self.trainer.options.on_nan == "skip":
            self._take_out(local, {i: f"the loss of its step ({self.trainer.step + 1}, all ranks) is {result.value}, "
                                      f"though no event's is on its own; on_nan='skip' quarantined the batch"
                                   for i in range(local.size)}, shrink=False)
        return result

    def _reduce_grads(self, params: list[torch.nn.Parameter], numbers: list[float]) -> list[float]:
        """The gradients' all-reduce of a distributed step (:func:`.stream_ranks.grad_reducer`), noting that this
        rank entered it."""
        self.reduced = True
        assert self.reducer is not None
        return self.reducer(params, numbers)

    def _ranks_attempt(self, local: StreamBatch | None, size: int) -> StepResult:
        """THE step of this rank's part; the batch's scores ride with the gradients' all-reduce.

        With them rides a count of the ranks whose part raised (``IndexError``, ``RuntimeError``): a rank whose
        forward or backward raises joins the all-reduce with no gradient and counts itself, and when the count is
        not zero no rank updates (``after_sync`` stops the step) and every rank returns a NaN loss, which
        :meth:`_ranks_step` searches for poison. So no rank waits in a collective another rank left."""
        trainer = self.trainer
        scores: dict[str, float] = {}
        redelivered = 0
        count = 0 if local is None else local.size
        self.reduced, self.failure = False, None
        try:
            batch = output = None
            if local is not None:
                batch = to_device(local.batch, trainer.device, self.dtype)
                output = _eval_output(trainer, batch)
                scores, _ = _prequential_metrics(trainer, output, target_of(batch), stateful=False)
                redelivered = local.redelivered
            numbers = [redelivered, 0.0] + [scores[name] * count if count else 0.0 for name in self.shared_metrics]
            # The loss is computed before the update: a test-then-train score.
            result = self.step_fn.step(batch, size, numbers=numbers, after_sync=_stop_when_a_rank_raised)
        except (IndexError, RuntimeError) as error:
            self.step_fn.skip()
            text = str(error).strip()
            first = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
            if self.reduced:  # raised after the all-reduce (in the update): the ranks cannot redo the step
                where = "" if local is None else f" (events {local.ids[0]!r} to {local.ids[-1]!r})"
                raise InputError(f"step {trainer.step + 1}{where}: {first}") from error
            self.failure = first
            # Join the all-reduce the other ranks are in: no gradient, and this rank counted as one that raised.
            self._reduce_grads(self.step_fn.params, [0.0, 0.0, 1.0] + [0.0] * len(self.shared_metrics))
            self.step_fn.skip()  # the gradients the other ranks summed in: not applied
            return StepResult(math.nan, value=math.nan)
        if result.numbers is not None:
            if result.numbers[1] > 0:  # another rank raised: nobody updated
                return StepResult(math.nan, value=math.nan)
            redelivered = int(result.numbers[0])
            scores = {name: total / size for name, total in zip(self.shared_metrics, result.numbers[2:])}
        running: dict[str, float] = {}
        if batch is not None and (result.value is None or math.isfinite(result.value)):
            running = _prequential_metrics(trainer, output, target_of(batch), means=False)[1]
        self.scored = (scores, running, redelivered)
        return result

    def skipped(self, mark: Closed) -> None:
        pass

    def columns(self, local: StreamBatch | None, mark: Closed, result: StepResult) -> dict[str, Any]:
        scores, running, redelivered = self.scored
        size = mark.batch_size
        value = result.value
        assert value is not None
        self.redelivered += redelivered
        prequential = self.prequential
        prequential.add("loss", value, size)
        fit_loss = self.fit_loss
        fit_loss[0] += value * size
        fit_loss[1] += size
        for name, found in scores.items():
            prequential.add(name, found, size)
        if len(self.included) >= ACK_EVERY and self.trainer.checkpoint_dir is None:
            self._ack()  # nothing durable to wait for; acknowledged in bulk (one round trip to the broker each)
        columns = prequential.into({})
        if running:
            columns.update(running)
        columns["lag"] = math.nan if local is None else time.time() - local.oldest()
        columns["redelivered"] = self.redelivered
        columns["dead_letters"] = self.dead_before + self.source.quarantined - self.dead_mark
        if self.noise is not None:  # max_batch_size="auto": the cap in force for the next batch, and its source
            columns.update(batch_cap=self.cap, noise_scale=self.noise.b_simple,
                           noise_scale_low=self.noise.b_simple_lower(AUTO_Z))
        return columns

    def dead_letters(self) -> int:
        """Events quarantined in this run so far (this rank's)."""
        return self.dead_before + self.source.quarantined - self.dead_mark

    def end_steps(self) -> None:
        self.source.drop_buffer()  # read but not trained on: the broker delivers them again

    def epoch_done(self) -> bool:
        return True

    def epoch_record(self, epoch: int) -> dict[str, Any]:
        """``loss``, the prequential loss of this fit's events; ``redelivered`` and the prequential metrics of the
        whole run (``preq_<name>``)."""
        total, events = self.fit_loss
        record = {"loss": total / events if events else math.nan,
                  "redelivered": self.redelivered, "dead_letters": self.dead_letters()}
        record.update({k: v for k, v in self.prequential.columns().items() if not k.endswith("_window")})
        # Embeddings that hash ids into buckets (e.g. workloads.stream.HashedEmbedding) report their collisions.
        for name, module in self.trainer.module.named_modules():
            rate = getattr(module, "collision_rate", None)
            if callable(rate):
                record[f"collision_rate.{name}"] = float(rate())
        return record

    def next_epoch(self) -> None:
        self.passed = True

    def release(self) -> None:
        self._ack()

    def shown_loss(self) -> float:
        return float(self.trainer.history.column("preq_loss_window")[-1])

    def shown_note(self) -> str:
        dead = self.dead_letters()
        return f" {dead:,} dead letters" if dead else ""

    def _ack(self) -> None:
        self.included += self.source.take_quarantined()
        if self.included:
            self.source.ack(self.included)
            self.included = []

    def before_checkpoint(self) -> None:
        """Distributed: gather the ranks' consumer states, each with the ids its updates since its last ack used."""
        if self.ranks is not None:
            self.rank_states = pending_once(gathered(self.trainer.dist, self._consumer_state()))

    def _consumer_state(self) -> dict[str, Any]:
        self.included += self.source.take_quarantined()
        return {**self.source.state_dict(), "included": list(self.included)}

    def after_checkpoint(self) -> None:
        """Acknowledge the events the checkpoint includes; distributed, once every rank knows it is durable."""
        if self.ranks is not None:
            barrier(self.trainer.dist)
        self._ack()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "batcher": {},  # a stream has no position of its own: the broker keeps it
            # Each rank's consumer state, with the ids its updates since the last ack used (acknowledged on resume).
            "stream": {"ranks": self.rank_states if self.ranks is not None else pending_once([self._consumer_state()]),
                       "redelivered": self.redelivered, "dead_letters": self.dead_letters(),
                       "fit_loss": [self.epoch, *self.fit_loss],
                       "prequential": self.prequential.state_dict(),
                       "noise": None if self.noise is None else {**self.noise.state_dict(), "cap": self.cap}},
            "config": self.config(),
        }

    def check(self, state: dict[str, Any], path: Path) -> None:
        if state.get("kind") != "stream":
            raise CheckpointError(f"checkpoint {path} was written by training on a dataset, not on a stream; "
                                  f"use another checkpoint_dir")
        saved = state.get("stream", {}).get("ranks", [{}])
        world_size = self.trainer.dist.world_size
        if len(saved) != world_size and isinstance(self.source.consumer, IterableEvents):
            raise CheckpointError(f"checkpoint {path} was written by {len(saved)} ranks reading plain iterables, "
                                  f"which resume only on as many ranks; this run has world_size={world_size}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stream's part of a checkpoint.

        A rank takes over the consumer states of the saved ranks ``r`` with ``r % world_size == rank``: their
        included events are acknowledged; events a saved rank had read but not trained on stay pending at
        the broker, where this run's consumers claim them (``RedisStream(claim_idle=...)``).
        """
        stream = state["stream"]
        saved = stream.get("ranks", [stream])  # a checkpoint of one process from before ranks were saved
        dist = self.trainer.dist
        mine = list(each_rank(saved, dist.rank, dist.world_size))
        consumer = {**(mine[0] if mine else {}), "included": [i for s in mine for i in s.get("included", [])]}
        self.prequential.load_state_dict(stream["prequential"])
        if self.noise is not None and stream.get("noise") is not None:
            self.noise.load_state_dict(stream["noise"])
            # A checkpoint from before the cap was kept: it starts again from batch_size (and may double each
            # measurement).
            self.cap = int(stream["noise"].get("cap", self.batch_size))
        self.redelivered = int(stream["redelivered"])
        self.dead_before, self.dead_mark = int(stream.get("dead_letters", 0)), self.source.quarantined
        self.epoch = len(self.trainer.history.epochs) + 1
        epoch, total, events = stream.get("fit_loss", [0, 0.0, 0])
        self.fit_loss = [float(total), int(events)] if int(epoch) == self.epoch else [0.0, 0]
        self.source.load_state_dict(consumer)  # events the checkpoint includes are acknowledged, not trained on again

    def fell_back(self, state: dict[str, Any], path: Path, skipped: list[Path]) -> None:
        """Newer checkpoints are unreadable: the events acknowledged after ``path`` are read again (the consumer's
        ``replay``), or the run is refused when they cannot be.

        The events to read again are those of the whole group (every rank's), so in a distributed run rank 0 reads
        them all; the events the checkpoint includes are those of every saved rank.
        """
        consumer = self.source.consumer
        why = (f"the newer checkpoints {', '.join(p.name for p in skipped)} are unreadable and {path.name} is older: "
               f"the events acknowledged after it are in none of the readable checkpoints")
        replay = getattr(consumer, "replay", None)
        if not callable(replay):
            raise CheckpointError(f"{why}, and {type(consumer).__name__} cannot read them again (it has no replay()). "
                                  f"Restore the damaged files, or move them away to resume from {path.name} without "
                                  f"those events")
        saved = state["stream"].get("ranks", [state["stream"]])
        count = 0
        if self.trainer.dist.rank == 0:
            try:
                count = replay({**saved[0], "included": [i for rank in saved for i in rank.get("included", [])]})
            except CheckpointError as error:
                raise CheckpointError(f"{why}; {error}") from None
            logger.warning("%s: %s events acknowledged after it are read from the stream again", why, count)

    def resumed_at(self) -> str:
        return f"{self.trainer.samples_seen} events"

    def config(self) -> dict[str, Any]:
        trainer = self.trainer
        config = dataclasses.asdict(trainer.options)
        config.update(device=str(trainer.device), optimizer=type(trainer.optimizer).__name__, stream=True,
                      num_samples=None, world_size=trainer.dist.world_size)
        return config


def pending_once(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ranks' consumer states as a checkpoint stores them: each id pending at the broker listed once.

    A consumer's ``position["pending"]`` (:class:`~batchfit.RedisStream`'s: every id pending in the group, of
    any consumer) holds the ids each rank lists as ``included`` too, and every rank's holds the whole group's.
    It is kept in rank 0's state only (the one a fall-back's ``replay`` reads), less the ids some rank includes
    (which ``replay`` leaves out anyway, so a checkpoint written before this reads the same). The states are
    changed in place, and returned.
    """
    included = {str(i) for state in states for i in state.get("included", [])}
    for rank, state in enumerate(states):
        position = state.get("position")
        if not isinstance(position, dict) or "pending" not in position:
            continue
        if rank == 0:
            state["position"] = {**position, "pending": [i for i in position["pending"] if str(i) not in included]}
        else:
            state["position"] = {k: v for k, v in position.items() if k != "pending"}
    return states


def _stop_when_a_rank_raised(result: StepResult) -> StepResult:
    """A distributed stream step's ``after_sync``: no update when some rank's part raised (its count rode with
    the gradients, second among the numbers)."""
    if result.numbers is not None and result.numbers[1] > 0:
        result.stop = True
    return result


def _eval_output(trainer: Trainer, batch: Batch) -> Any:
    """The model's output on a batch it has not trained on yet (eval mode, no gradients); ``None`` without
    user metrics."""
    if not trainer.evaluator.metrics:
        return None
    trainer.module.eval()
    try:
        with torch.no_grad():
            return forward(trainer.module, batch)
    finally:
        trainer.module.train()


def _prequential_metrics(trainer: Trainer, output: Any, target: Any, means: bool = True,
                         stateful: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """The user's metrics of an output of weights that had not seen the batch (:func:`_eval_output`).

    Returns the batch values of callables (averaged over the stream by :class:`Prequential`; with ``means``) and
    the values of stateful metrics (``update``/``compute``, with ``stateful``: called once the batch's step is
    known to stand), which accumulate every batch of the stream.
    """
    metrics = trainer.evaluator.metrics
    if not metrics:
        return {}, {}
    found, running = {}, {}
    with torch.no_grad():
        for name, metric in metrics.items():
            if is_stateful(metric):
                if stateful:
                    metric.update(output, target)
                    running[f"preq_{name}"] = float(metric.compute())
            elif means:
                found[name] = float(metric(output, target))
    return found, running
