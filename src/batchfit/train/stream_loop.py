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
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..core.batch import Batch, forward, param_dtype, target_of, to_device
from ..core.rng import rng_state, set_rng_state
from ..core.step import Step
from ..data.streams import StreamBatch, StreamSource
from ..errors import BatchfitError, CheckpointError, check_positive_int, expected
from . import checkpoint as ckpt
from .callbacks import overriding
from .guards import exit_for, non_finite_error
from .history import History
from .metrics import is_stateful

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger("batchfit")

# Samples in the window of the windowed prequential metrics.
PREQUENTIAL_WINDOW = 1000
STREAM_RESUME_KEYS = ("batch_size", "optimizer")
# Without a checkpoint_dir, events are acknowledged once this many have been trained on (and at the end).
ACK_EVERY = 1024

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
    redelivered: int = 0  # events trained on that had been delivered before
    prequential: Prequential = dataclasses.field(default_factory=Prequential)
    elapsed_before: float = 0.0
    start: float = 0.0
    last_batch: StreamBatch | None = None


def check_until(until: Any) -> None:
    """Refuse anything but ``None``, a positive number of seconds or a callable ``until(trainer) -> bool``."""
    if until is None or callable(until):
        return
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not until > 0:
        raise expected("until", "None, a positive number of seconds, or a callable until(trainer) -> bool", until)


def fit_stream(trainer: Trainer, source: StreamSource, *, max_steps: int | None = None, until: Any = None,
               val: Any = None, resume: bool | str = False) -> History:
    """Train on ``source`` until it ends, ``max_steps`` steps, ``until`` or SIGTERM/SIGINT; see ``Trainer.fit``."""
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
    if trainer.dist.enabled:
        raise BatchfitError("training from a stream runs in one process for now. Received: a distributed run of "
                            f"world_size={trainer.dist.world_size}")
    run = StreamRun(source)
    micro = o.micro_batch_size if isinstance(o.micro_batch_size, int) else None
    trainer.step_fn = Step(trainer.model, trainer.loss_fn, trainer.optimizer, device=trainer.device,
                           precision=o.precision, micro_batch_size=micro, max_grad_norm=o.max_grad_norm,
                           loss_count=trainer.loss_count)
    lock = ckpt.FolderLock(trainer.checkpoint_dir) if trainer.checkpoint_dir is not None else None
    try:
        if lock is not None:
            lock.acquire()
        found = ckpt.load_latest(trainer.checkpoint_dir) if resume and trainer.checkpoint_dir is not None else None
        if found is not None:
            _resume(trainer, run, *found)
        steps = None if max_steps is None else (max_steps if resume else trainer.step + max_steps)
        with trainer.signals.installed(trainer.checkpoint_dir is not None):
            _loop(trainer, run, steps, until)
    finally:
        if lock is not None:
            lock.release()
    _end(trainer, run, val)
    return trainer.history


def _loop(trainer: Trainer, run: StreamRun, max_steps: int | None, until: Any) -> None:
    source, batch_size = run.source, trainer.options.batch_size
    assert isinstance(batch_size, int)
    hooks = {name: overriding(trainer.callbacks, name) for name in ("on_fit_begin", "on_step_begin",
                                                                      "on_step_end", "on_fit_end")}
    trainer.stop_training = False
    for hook in hooks["on_fit_begin"]:
        hook(trainer)
    trainer.module.train()
    run.start = time.perf_counter()
    deadline = run.start + until if isinstance(until, (int, float)) else None
    trainer.lr.apply(trainer.step, batch_size)
    every = trainer.options.checkpoint_every
    while not trainer.stop_training and (max_steps is None or trainer.step < max_steps):
        if trainer.signals.received is not None:
            _exit_on_signal(trainer, run)
        if deadline is not None and time.perf_counter() >= deadline or callable(until) and until(trainer):
            break
        stream_batch = source.next_batch(batch_size)
        if stream_batch is None:
            if source.ended:
                break
            continue  # an idle tick: look at signals and budgets again
        for hook in hooks["on_step_begin"]:
            hook(trainer, trainer.step)
        record = _train_on(trainer, run, stream_batch)
        if record is not None:
            for hook in hooks["on_step_end"]:
                hook(trainer, record)
        if trainer.checkpoint_dir is None and len(run.included) >= ACK_EVERY:
            _ack(run)  # nothing durable to wait for; acknowledged in bulk (one round trip to the broker each)
        elif every is not None and trainer.step % every == 0 and record is not None:
            _checkpoint(trainer, run)
    if trainer.signals.received is not None:
        _exit_on_signal(trainer, run)
    source.drop_buffer()  # read but not trained on: the broker delivers them again
    if trainer.checkpoint_dir is not None:
        _checkpoint(trainer, run)
    else:
        _ack(run)
    for hook in hooks["on_fit_end"]:
        hook(trainer, trainer.history)


def _train_on(trainer: Trainer, run: StreamRun, stream_batch: StreamBatch) -> dict[str, Any] | None:
    """Score the batch with the current weights, then train on it; returns the step's record (None: skipped)."""
    step_fn = trainer.step_fn
    assert step_fn is not None
    batch = to_device(stream_batch.batch, trainer.device, param_dtype(trainer.module))
    size = stream_batch.size
    if trainer.lr.dynamic:
        trainer.lr.apply(trainer.step, size)
    scores, running = _prequential_metrics(trainer, batch)
    run.included += stream_batch.ids
    run.last_batch = stream_batch
    try:
        loss = float(step_fn.accumulate(batch, size).loss)  # computed before the update: a test-then-train score
    except (IndexError, RuntimeError) as error:
        step_fn.skip()
        raise BatchfitError(f"step {trainer.step + 1} (events {stream_batch.ids[0]!r} to {stream_batch.ids[-1]!r}): "
                            f"{str(error).strip().splitlines()[0]}") from error
    if not math.isfinite(loss):
        step_fn.skip()
        if trainer.options.on_nan == "raise":
            raise non_finite_error(loss, trainer.step + 1, 0)
        trainer.skipped_steps += 1
        logger.warning("non-finite loss at step %d of the stream: skipped the update (%d skipped so far)",
                       trainer.step + 1, trainer.skipped_steps)
        return None
    step_fn.update()
    trainer.step += 1
    trainer.samples_seen += size
    run.redelivered += stream_batch.redelivered
    run.prequential.add("loss", loss, size)
    for name, value in scores.items():
        run.prequential.add(name, value, size)
    seconds = run.elapsed_before + time.perf_counter() - run.start
    lag = time.time() - min(stream_batch.times)
    lr = float(trainer.optimizer.param_groups[0]["lr"])
    trainer.history.add_step(trainer.step, 0, trainer.samples_seen, size, loss, lr, seconds,
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
    """Write a checkpoint that includes every update so far, then acknowledge the events it includes."""
    assert trainer.checkpoint_dir is not None
    ckpt.save_checkpoint(_state(trainer, run), trainer.checkpoint_dir, trainer.step, trainer.options.keep_checkpoints)
    _ack(run)


def _state(trainer: Trainer, run: StreamRun) -> dict[str, Any]:
    step_fn = trainer.step_fn
    assert step_fn is not None
    config = dataclasses.asdict(trainer.options)
    config.update(device=str(trainer.device), optimizer=type(trainer.optimizer).__name__, stream=True,
                  num_samples=None)
    return {
        "format": 1,
        "kind": "stream",
        "model": trainer.module.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": None if step_fn.scaler is None else step_fn.scaler.state_dict(),
        "step": trainer.step,
        "samples_seen": trainer.samples_seen,
        "skipped_steps": trainer.skipped_steps,
        "batcher": {},  # a stream has no position of its own: the broker keeps it
        "stream": {**run.source.state_dict(), "included": list(run.included),
                   "redelivered": run.redelivered, "prequential": run.prequential.state_dict()},
        "rng": rng_state(),
        "history": trainer.history.state_dict(),
        "elapsed": run.elapsed_before + time.perf_counter() - run.start,
        "callbacks": [cb.state_dict() for cb in trainer.callbacks],
        "config": config,
        "world_size": 1,
    }


def _resume(trainer: Trainer, run: StreamRun, state: dict[str, Any], path: Any) -> None:
    """Load a stream checkpoint (refused before anything changes when it does not fit)."""
    if state.get("kind") != "stream":
        raise CheckpointError(f"checkpoint {path} was written by training on a dataset, not on a stream; "
                              f"use another checkpoint_dir")
    ckpt.check_compatible(state.get("config", {}), {"batch_size": trainer.options.batch_size,
                                                    "optimizer": type(trainer.optimizer).__name__},
                          STREAM_RESUME_KEYS, path)
    ckpt.check_fits(state, trainer.module, trainer.optimizer, path)
    step_fn = trainer.step_fn
    assert step_fn is not None
    try:
        trainer.module.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if step_fn.scaler is not None and state["scaler"] is not None:
            step_fn.scaler.load_state_dict(state["scaler"])
        trainer.history.load_state_dict(state["history"])
        for cb, cb_state in zip(trainer.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        stream = state["stream"]
        run.prequential.load_state_dict(stream["prequential"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {error}") from error
    trainer.step, trainer.samples_seen = int(state["step"]), int(state["samples_seen"])
    trainer.skipped_steps = int(state["skipped_steps"])
    run.redelivered = int(stream["redelivered"])
    run.elapsed_before = float(state["elapsed"])
    run.source.load_state_dict(stream)  # events the checkpoint includes are acknowledged, not trained on again
    set_rng_state(state["rng"])
    trainer.lr.invalidate()
    logger.info("resumed the stream from %s at step %d (%d events)", path, trainer.step, trainer.samples_seen)


def _exit_on_signal(trainer: Trainer, run: StreamRun) -> None:
    signum = trainer.signals.received
    assert signum is not None
    trainer.signals.received = None
    run.source.drop_buffer()
    _checkpoint(trainer, run)
    logger.warning("received signal %d: saved a checkpoint of the stream at step %d and stopped", signum, trainer.step)
    raise exit_for(signum)


def _end(trainer: Trainer, run: StreamRun, val: Any) -> None:
    """One record in ``history.epochs`` per fit: the prequential metrics, and validation metrics of ``val``."""
    record: dict[str, Any] = {"epoch": len(trainer.history.epochs), "loss": math.nan, "steps": trainer.step,
                              "samples": trainer.samples_seen, "seconds": run.elapsed_before + time.perf_counter()
                              - run.start, "redelivered": run.redelivered}
    columns = run.prequential.columns()
    if "preq_loss" in columns:
        record["loss"] = columns["preq_loss"]
    record.update({k: v for k, v in columns.items() if not k.endswith("_window")})
    if val is not None:
        record.update({f"val_{k}": v for k, v in trainer.evaluate(val).items()})
    trainer.history.epochs.append(record)
