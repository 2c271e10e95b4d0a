"""Training from a stream of events: batches cut by size or time, test-then-train, ack after a durable checkpoint.

``Trainer.fit(stream)`` runs :func:`fit_stream`. It reuses the trainer's pieces — THE step, the
lr control, the history, the callbacks, checkpoint files and the signal guard — in a loop whose
order is that of the algorithm:

1. wait for the next batch (``batch_size`` events, or fewer after ``max_latency`` seconds);
2. score it with the weights that have not seen it (the prequential, test-then-train metrics:
   the step's own forward pass computes the loss before the update; user metrics take one more
   forward pass without gradients);
3. forward, backward and update (:class:`~batchfit.core.step.Step`);
4. every ``checkpoint_every`` steps: write a checkpoint that lists the events it includes, then
   acknowledge them. A crash between the two re-acknowledges them on resume; a crash before the
   checkpoint leaves them pending at the broker, which delivers them again: no event is lost, and
   an event is trained on twice only when its update was lost (at most one checkpoint interval).

Torch lr schedulers step after each update; each ``fit`` call is one epoch for callbacks and per-epoch
schedulers. In a distributed run the ranks agree before each step on their contributions to the batch,
and the step's gradients are averaged over ranks explicitly (:mod:`.stream_ranks`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..core.batch import Batch, forward, param_dtype, target_of, to_device
from ..core.rng import rng_state, set_rng_state
from ..core.step import Step
from ..data.streams import IterableEvents, StreamBatch, StreamSource
from ..errors import BatchfitError, CheckpointError, DistributedError, NonFiniteLossError, check_positive_int, expected
from . import checkpoint as ckpt
from .callbacks import HOOKS, overriding
from .guards import exit_for, non_finite_error
from .history import History
from .metrics import is_stateful
from .progress import Progress
from .saving import load_model_state, model_state
from .stream_ranks import StreamRanks, barrier, each_rank, gathered, reduce_step, sparse_parameters

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger("batchfit")

# Samples in the window of the windowed prequential metrics.
PREQUENTIAL_WINDOW = 1000
STREAM_RESUME_KEYS = ("batch_size", "optimizer")
# Without a checkpoint_dir, events are acknowledged once this many have been trained on (and at the end).
ACK_EVERY = 1024
# Seconds between two calls of the callbacks' on_log (loggers), as in the Trainer's loop.
LOG_EVERY = 2.0

Until = Callable[["Trainer"], bool]


class Prequential:
    """Sample-weighted running means of per-batch metrics, over the whole run and over a recent window."""

    def __init__(self, window: int = PREQUENTIAL_WINDOW) -> None:
        self.window = window
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.recent: dict[str, collections.deque[tuple[float, int]]] = {}
        self.recent_sums: dict[str, list[float]] = {}

    def add(self, name: str, value: float, size: int) -> None:
        """Fold one batch's mean ``value`` over ``size`` samples in."""
        self.sums[name] = self.sums.get(name, 0.0) + value * size
        self.counts[name] = self.counts.get(name, 0) + size
        recent = self.recent.setdefault(name, collections.deque())
        totals = self.recent_sums.setdefault(name, [0.0, 0])
        recent.append((value * size, size))
        totals[0] += value * size
        totals[1] += size
        while totals[1] - recent[0][1] >= self.window:
            dropped, count = recent.popleft()
            totals[0] -= dropped
            totals[1] -= count

    def columns(self) -> dict[str, float]:
        """``preq_<name>`` (the mean over every sample so far) and ``preq_<name>_window`` (the last samples)."""
        found = {}
        for name, total in self.sums.items():
            found[f"preq_{name}"] = total / self.counts[name]
            window_sum, window_count = self.recent_sums[name]
            found[f"preq_{name}_window"] = window_sum / window_count
        return found

    def state_dict(self) -> dict[str, Any]:
        """Sums and counts (the window starts empty again after a resume)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.recent = {k: collections.deque() for k in self.sums}
        self.recent_sums = {k: [0.0, 0] for k in self.sums}


@dataclasses.dataclass
class StreamRun:
    """The state of one stream run that a checkpoint keeps, besides the trainer's own."""

    source: StreamSource
    included: list[Any] = dataclasses.field(default_factory=list)  # ids trained on since the last ack
    redelivered: int = 0  # events trained on that had been delivered before (all ranks)
    prequential: Prequential = dataclasses.field(default_factory=Prequential)
    elapsed_before: float = 0.0
    start: float = 0.0
    last_batch: StreamBatch | None = None
    ranks: StreamRanks | None = None  # a distributed run's agreement
    sparse: list[bool] = dataclasses.field(default_factory=list)  # per parameter: sparse gradients (distributed)
    epoch: int = 1  # this fit's number: what callbacks and schedulers see as the epoch


def check_until(until: Any) -> None:
    """Refuse anything but ``None``, a positive number of seconds or a callable ``until(trainer) -> bool``."""
    if until is None or callable(until):
        return
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not until > 0:
        raise expected("until", "None, a positive number of seconds, or a callable until(trainer) -> bool", until)


def fit_stream(trainer: Trainer, source: StreamSource, *, max_steps: int | None = None, until: Any = None,
               val: Any = None, resume: bool | str = False) -> History:
    """Train on ``source`` until it ends, ``max_steps`` steps, ``until`` or SIGTERM/SIGINT; see ``Trainer.fit``.

    In a distributed run each rank passes its own source (one consumer of a shared group, e.g. a
    :class:`~batchfit.RedisStream` with a consumer name per rank), and each step trains on the union of
    the ranks' batches (:mod:`.stream_ranks`).
    """
    o = trainer.options
    if not isinstance(o.batch_size, int):
        raise expected("batch_size", "a positive integer when training from a stream (events per update; "
                       "'full', 'auto' and 'adaptive' need a dataset of known size)", o.batch_size)
    if o.micro_batch_size == "auto":
        raise expected("micro_batch_size", "an integer or None when training from a stream", "auto")
    if max_steps is not None:
        check_positive_int("max_steps", max_steps)
    check_until(until)
    if resume not in (False, True, "force"):
        raise expected("resume", "False, True or 'force'", resume)
    if resume and trainer.checkpoint_dir is None:
        raise expected("checkpoint_dir", "a folder when resume=True", None)
    run = StreamRun(source, epoch=len(trainer.history.epochs) + 1)
    micro = o.micro_batch_size if isinstance(o.micro_batch_size, int) else None
    dist = trainer.dist
    # Distributed: the plain module, whose gradients the loop averages over ranks itself (a rank may have
    # no event in a step, which DDP cannot express); the loss is weighted as DDP would need it.
    trainer.step_fn = Step(trainer.module if dist.enabled else trainer.model, trainer.loss_fn, trainer.optimizer,
                           device=trainer.device, precision=o.precision, micro_batch_size=micro,
                           max_grad_norm=o.max_grad_norm, world_size=dist.world_size, loss_count=trainer.loss_count)
    if dist.enabled:
        run.ranks = StreamRanks(dist, source, o.batch_size, trainer.device)
        run.sparse = sparse_parameters(trainer.module, trainer.step_fn.params)
    lock = ckpt.FolderLock(trainer.checkpoint_dir) if trainer.checkpoint_dir is not None and dist.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        found = ckpt.load_latest(trainer.checkpoint_dir) if resume and trainer.checkpoint_dir is not None else None
        if found is not None:
            _resume(trainer, run, *found)
        if resume and not dist.all_equal(trainer.step):
            raise DistributedError(f"rank {dist.rank}: the ranks resumed from checkpoints of different steps (this "
                                   f"one: step {trainer.step}); every rank must see the same checkpoint_dir")
        steps = None if max_steps is None else (max_steps if resume else trainer.step + max_steps)
        with trainer.signals.installed(trainer.checkpoint_dir is not None):
            _loop(trainer, run, steps, until, val)
    except BaseException as error:
        if not dist.enabled or isinstance(error, (SystemExit, KeyboardInterrupt, NonFiniteLossError)):
            raise  # every rank raises these at the same step
        replacement = dist.abort(error)  # the other ranks stop now instead of at the timeout
        if replacement is None:
            raise
        raise replacement from None
    finally:
        if lock is not None:
            lock.release()
    return trainer.history


def _loop(trainer: Trainer, run: StreamRun, max_steps: int | None, until: Any, val: Any) -> None:
    source, batch_size, ranks = run.source, trainer.options.batch_size, run.ranks
    assert isinstance(batch_size, int)
    hooks = {name: overriding(trainer.callbacks, name) for name in HOOKS}
    progress = Progress(trainer.progress, epochs_only=trainer.options.progress == "epochs")
    trainer.stop_training = False
    for hook in hooks["on_fit_begin"]:
        hook(trainer)
    for hook in hooks["on_epoch_begin"]:
        hook(trainer, run.epoch)
    trainer.module.train()
    run.start = time.perf_counter()
    deadline = run.start + until if isinstance(until, (int, float)) else None
    trainer.lr.begin(batch_size)
    trainer.lr.apply(trainer.step, batch_size)
    every = trainer.options.checkpoint_every
    start_step, start_samples = trainer.step, trainer.samples_seen
    # An open-ended stream has no total (0: the bar counts steps without one).
    progress.start_epoch(run.epoch, run.epoch, 0 if max_steps is None else max_steps - start_step, 0, run.start)
    next_log = run.start + LOG_EVERY
    while max_steps is None or trainer.step < max_steps:
        budget = deadline is not None and time.perf_counter() >= deadline or callable(until) and until(trainer)
        if ranks is None:
            if trainer.signals.received is not None:
                _exit_on_signal(trainer, run)
            if trainer.stop_training or budget:
                break
            local = source.next_batch(batch_size)
            if local is None:
                if source.ended:
                    break
                continue  # an idle tick: look at signals and budgets again
            global_size = local.size
        else:
            plan = ranks.plan(trainer.stop_training or bool(budget), trainer.signals.received is not None)
            if plan.signal:  # every rank learns it at the same step: all checkpoint together and stop
                _exit_on_signal(trainer, run)
            if plan.stop or plan.ended:
                break
            global_size = plan.global_size
            if global_size == 0:
                continue
            local = ranks.take(plan)
        for hook in hooks["on_step_begin"]:
            hook(trainer, trainer.step)
        record = _train_on(trainer, run, local, global_size)
        if record is not None:
            for hook in hooks["on_step_end"]:
                hook(trainer, record)
        now = time.perf_counter()
        if hooks["on_log"] and now >= next_log:
            for hook in hooks["on_log"]:
                hook(trainer)
            next_log = now + LOG_EVERY
        if trainer.checkpoint_dir is None and len(run.included) >= ACK_EVERY:
            _ack(run)  # nothing durable to wait for; acknowledged in bulk (one round trip to the broker each)
        elif every is not None and trainer.step % every == 0 and record is not None:
            _checkpoint(trainer, run)
        if progress.due(now) and record is not None:
            rate = (trainer.samples_seen - start_samples) / max(now - run.start, 1e-9)
            progress.refresh(now, trainer.step - start_step, rate, record["preq_loss_window"], record["lr"])
    if ranks is None and trainer.signals.received is not None:
        _exit_on_signal(trainer, run)
    if trainer.step > start_step:  # the bar's last state, before its closing line
        now = time.perf_counter()
        last = trainer.history.record(-1)
        rate = (trainer.samples_seen - start_samples) / max(now - run.start, 1e-9)
        progress.refresh(now, trainer.step - start_step, rate, last["preq_loss_window"], last["lr"])
    source.drop_buffer()  # read but not trained on: the broker delivers them again
    record = _end(trainer, run, val)
    progress.end_epoch(record)
    if trainer.step > start_step:  # a fit without a step has no loss to judge a plateau by
        trainer.lr.after_epoch(record)
    for hook in hooks["on_epoch_end"]:
        hook(trainer, run.epoch, record)
    if trainer.checkpoint_dir is not None:
        _checkpoint(trainer, run)
    else:
        _ack(run)
    for hook in hooks["on_fit_end"]:
        hook(trainer, trainer.history)


def _train_on(trainer: Trainer, run: StreamRun, local: StreamBatch | None, global_size: int) -> dict[str, Any] | None:
    """Score this rank's events with the current weights, then train on the step's batch; returns the step's
    record (None: skipped). ``local`` is ``None`` for a rank that holds no event of the step."""
    step_fn = trainer.step_fn
    assert step_fn is not None
    if trainer.lr.dynamic:
        trainer.lr.apply(trainer.step, global_size)
    scores: dict[str, float] = {}
    running: dict[str, float] = {}
    share = 0.0
    redelivered = 0
    if local is not None:
        batch = to_device(local.batch, trainer.device, param_dtype(trainer.module))
        scores, running = _prequential_metrics(trainer, batch)
        run.included += local.ids
        run.last_batch = local
        redelivered = local.redelivered
        try:
            # Computed before the update: a test-then-train score (this rank's share of the batch's mean loss).
            share = float(step_fn.accumulate(batch, global_size).loss)
        except (IndexError, RuntimeError) as error:
            step_fn.skip()
            raise BatchfitError(f"step {trainer.step + 1} (events {local.ids[0]!r} to {local.ids[-1]!r}): "
                                f"{str(error).strip().splitlines()[0]}") from error
    loss = share
    if run.ranks is not None:
        names = [name for name, metric in trainer.evaluator.metrics.items() if not is_stateful(metric)]
        size = 0 if local is None else local.size
        totals = reduce_step(trainer.dist, step_fn.params, run.sparse,
                             [share, redelivered] + [scores[name] * size if size else 0.0 for name in names])
        loss, redelivered = totals[0], int(totals[1])
        scores = {name: total / global_size for name, total in zip(names, totals[2:])}
    if not math.isfinite(loss):
        step_fn.skip()
        if trainer.options.on_nan == "raise":
            raise non_finite_error(loss, trainer.step + 1, 0)
        trainer.skipped_steps += 1
        logger.warning("non-finite loss at step %d of the stream: skipped the update (%d skipped so far)",
                       trainer.step + 1, trainer.skipped_steps)
        return None
    lr = float(trainer.optimizer.param_groups[0]["lr"])  # the lr of this update, whoever set it
    step_fn.update()
    trainer.lr.after_update()  # a torch scheduler that runs per step
    trainer.step += 1
    trainer.samples_seen += global_size
    run.redelivered += redelivered
    run.prequential.add("loss", loss, global_size)
    for name, value in scores.items():
        run.prequential.add(name, value, global_size)
    seconds = run.elapsed_before + time.perf_counter() - run.start
    lag = math.nan if local is None else time.time() - min(local.times)
    trainer.history.add_step(trainer.step, run.epoch, trainer.samples_seen, global_size, loss, lr, seconds,
                             **run.prequential.columns(), **running, lag=lag, redelivered=run.redelivered)
    return trainer.history.record(-1)


def _prequential_metrics(trainer: Trainer, batch: Batch) -> tuple[dict[str, float], dict[str, float]]:
    """The user's metrics on a batch the model has not trained on yet (eval mode, no gradients).

    Returns the batch values of callables (averaged over the stream by :class:`Prequential`) and the
    values of stateful metrics (``update``/``compute``), which accumulate every batch of the stream.
    """
    metrics = trainer.evaluator.metrics
    if not metrics:
        return {}, {}
    target = target_of(batch)
    means, running = {}, {}
    trainer.module.eval()
    try:
        with torch.no_grad():
            output = forward(trainer.module, batch)
            for name, metric in metrics.items():
                if is_stateful(metric):
                    metric.update(output, target)
                    running[f"preq_{name}"] = float(metric.compute())
                else:
                    means[name] = float(metric(output, target))
    finally:
        trainer.module.train()
    return means, running


def _ack(run: StreamRun) -> None:
    if run.included:
        run.source.ack(run.included)
        run.included = []


def _checkpoint(trainer: Trainer, run: StreamRun) -> None:
    """Write a checkpoint that includes every update so far, then acknowledge the events it includes.

    Distributed: the ranks' consumer states (with the ids each trained on since its last ack) are
    gathered, rank 0 writes the checkpoint, and every rank acknowledges its own events only once the
    ranks have met again after the write.
    """
    assert trainer.checkpoint_dir is not None
    mine = {**run.source.state_dict(), "included": list(run.included)}
    states = [mine] if run.ranks is None else gathered(trainer.dist, mine)
    if trainer.dist.is_main:
        ckpt.save_checkpoint(_state(trainer, run, states), trainer.checkpoint_dir, trainer.step,
                             trainer.options.keep_checkpoints)
    if run.ranks is not None:
        barrier(trainer.dist)
    _ack(run)


def _state(trainer: Trainer, run: StreamRun, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    step_fn = trainer.step_fn
    assert step_fn is not None
    config = dataclasses.asdict(trainer.options)
    config.update(device=str(trainer.device), optimizer=type(trainer.optimizer).__name__, stream=True,
                  num_samples=None, world_size=trainer.dist.world_size)
    return {
        "format": 1,
        "kind": "stream",
        "model": model_state(trainer.module),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": None if step_fn.scaler is None else step_fn.scaler.state_dict(),
        "lr_scheduler": trainer.lr.state_dict(),
        "step": trainer.step,
        "samples_seen": trainer.samples_seen,
        "skipped_steps": trainer.skipped_steps,
        "batcher": {},  # a stream has no position of its own: the broker keeps it
        # Each rank's consumer state, with the ids its updates since the last ack used (acknowledged on resume).
        "stream": {"ranks": ranks, "redelivered": run.redelivered, "prequential": run.prequential.state_dict()},
        "rng": rng_state(),
        "history": trainer.history.state_dict(),
        "elapsed": run.elapsed_before + time.perf_counter() - run.start,
        "callbacks": [cb.state_dict() for cb in trainer.callbacks],
        "config": config,
        "world_size": trainer.dist.world_size,
    }


def _resume(trainer: Trainer, run: StreamRun, state: dict[str, Any], path: Any) -> None:
    """Load a stream checkpoint (refused before anything changes when it does not fit).

    A rank takes over the consumer states of the saved ranks ``r`` with ``r % world_size == rank``: their
    included events are acknowledged; events a saved rank had read but not trained on stay pending at
    the broker, where this run's consumers claim them (``RedisStream(claim_idle=...)``).
    """
    if state.get("kind") != "stream":
        raise CheckpointError(f"checkpoint {path} was written by training on a dataset, not on a stream; "
                              f"use another checkpoint_dir")
    ckpt.check_compatible(state.get("config", {}), {"batch_size": trainer.options.batch_size,
                                                    "optimizer": type(trainer.optimizer).__name__},
                          STREAM_RESUME_KEYS, path)
    ckpt.check_fits(state, trainer.module, trainer.optimizer, path)
    stream = state.get("stream", {})
    saved = stream.get("ranks", [stream])  # a checkpoint of one process from before ranks were saved
    dist = trainer.dist
    if len(saved) != dist.world_size and isinstance(run.source.consumer, IterableEvents):
        raise CheckpointError(f"checkpoint {path} was written by {len(saved)} ranks reading plain iterables, which "
                              f"resume only on as many ranks; this run has world_size={dist.world_size}")
    mine = list(each_rank(saved, dist.rank, dist.world_size))
    consumer = {**(mine[0] if mine else {}), "included": [i for s in mine for i in s.get("included", [])]}
    step_fn = trainer.step_fn
    assert step_fn is not None
    try:
        load_model_state(trainer.module, state["model"], "stream checkpoint")
        trainer.optimizer.load_state_dict(state["optimizer"])
        if step_fn.scaler is not None and state["scaler"] is not None:
            step_fn.scaler.load_state_dict(state["scaler"])
        trainer.lr.load_state_dict(state.get("lr_scheduler"))
        trainer.history.load_state_dict(state["history"])
        for cb, cb_state in zip(trainer.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        run.prequential.load_state_dict(stream["prequential"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {error}") from error
    trainer.step, trainer.samples_seen = int(state["step"]), int(state["samples_seen"])
    trainer.skipped_steps = int(state["skipped_steps"])
    run.redelivered = int(stream["redelivered"])
    run.elapsed_before = float(state["elapsed"])
    run.epoch = len(trainer.history.epochs) + 1
    run.source.load_state_dict(consumer)  # events the checkpoint includes are acknowledged, not trained on again
    set_rng_state(state["rng"])
    trainer.lr.invalidate()
    logger.info("resumed the stream from %s at step %d (%d events)", path, trainer.step, trainer.samples_seen)


def _exit_on_signal(trainer: Trainer, run: StreamRun) -> None:
    signum = trainer.signals.received or signal.SIGTERM  # distributed: another rank's signal acts as SIGTERM
    trainer.signals.received = None
    run.source.drop_buffer()
    if trainer.checkpoint_dir is not None:
        _checkpoint(trainer, run)
    logger.warning("received signal %d: saved a checkpoint of the stream at step %d and stopped", signum, trainer.step)
    raise exit_for(signum)


def _end(trainer: Trainer, run: StreamRun, val: Any) -> dict[str, Any]:
    """This fit's record in ``history.epochs``: ``loss``, the prequential loss of this fit's events; the
    prequential metrics of the whole run (``preq_<name>``), and validation metrics of ``val``."""
    history = trainer.history
    mine = [(loss, size) for loss, size, epoch in zip(history.losses(), history.column("batch_size"),
                                                       history.column("epoch")) if epoch == run.epoch]
    events = sum(size for _, size in mine)
    record: dict[str, Any] = {"epoch": run.epoch, "loss": sum(loss * size for loss, size in mine) / events
                              if events else math.nan, "steps": trainer.step, "samples": trainer.samples_seen,
                              "seconds": run.elapsed_before + time.perf_counter() - run.start,
                              "redelivered": run.redelivered}
    columns = run.prequential.columns()
    record.update({k: v for k, v in columns.items() if not k.endswith("_window")})
    if val is not None:
        record.update({f"val_{k}": v for k, v in trainer.evaluate(val).items()})
    if trainer.skipped_steps:
        record["skipped_steps"] = trainer.skipped_steps
    trainer.history.epochs.append(record)
    return record
