"""The Trainer: the mini-batch loop, from data to updated weights, for data sets and streams alike.

The loop is here, once: :meth:`Trainer._run` runs the epochs (hooks, the epoch record, the
checkpoint at an epoch's end) and :meth:`Trainer._run_steps` the steps, each in the same order:
THE step (:meth:`~batchfit.core.step.Step.step`: forward, backward, sync, the non-finite check,
update), then its bookkeeping (:class:`AfterStep`: scheduler, counters, history, hooks,
validation, logs, checkpoints, progress), or the non-finite loss policy when the step was not
applied. What differs between a data set and a stream is the *feed* the loop trains on
(:class:`~.session.Feed`): :class:`~.epochs.EpochFeed` (epochs of a batcher) or
:class:`~.stream_loop.StreamFeed` (batches closed by size or time, test-then-train scores,
acknowledgements after a durable checkpoint). A checkpoint is one :meth:`Trainer.state_dict`:
the trainer's state and the feed's.

The collaborators each do one job: the options (:mod:`.options`), the batch plan resolved once
(:mod:`.plan`), the learning rate as a function of step and batch size (:mod:`.lr_control`),
evaluation (:mod:`.evaluation`), the NaN and signal guards (:mod:`.guards`), the folder lock and
the failure of a rank (:mod:`.session`), checkpoint files (:mod:`.checkpoint`) and the per-step
agreement of a distributed run (:class:`~batchfit.distributed.StepAgreement`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..core.batch import Batch, LossFn
from ..core.device import resolve_device
from ..core.recompute import enable_gradient_checkpointing
from ..core.rng import rng_state, set_rng_state
from ..core.step import Step, StepResult
from ..data.batcher import Batcher
from ..data.sources import Source, as_source, fingerprint
from ..data.streams import StreamSource
from ..errors import (
    CheckpointError,
    DistributedError,
    InputError,
    NonFiniteLossError,
    check_positive_int,
    expected,
)
from ..measure.noise import NoiseScaleTracker
from ..sharding import ShardPolicy, check_shard, full_model_state, shard_model
from . import checkpoint as ckpt
from . import sharded_checkpoint as sharded
from .callbacks import HOOKS, Callback, overriding
from .checks import check_objects, error_at_step, options_from
from .epochs import EpochFeed
from .evaluation import Evaluator
from .first_batch import batch_dependent, check_first_batch, check_lengths, summary
from .guards import SignalGuard, check_losses, exit_for, non_finite_data, non_finite_error
from .history import History
from .lr_control import LRControl
from .metrics import Metric
from .options import TrainerOptions
from .plan import BatchPlan, plan_batches
from .progress import Progress
from .saving import load_model_state, model_state, save_model
from .session import LOG_EVERY, Feed, Mark, check_resume, session
from .stream_loop import STREAM_CHECKPOINT_SECONDS, StreamFeed, check_stream_fit

logger = logging.getLogger("batchfit")


class Trainer:
    """Trains ``model`` with ``optimizer`` on mini-batches; ``batch_size`` means samples per update.

    ``batch_size`` is an int, ``"full"`` (gradient descent over the whole dataset each step),
    ``"auto"`` (measured at the start) or ``"adaptive"`` (grows with the gradient noise scale).
    ``micro_batch_size`` splits each batch for memory (gradient accumulation); the update is
    the same for every split. The plain-valued options are the fields of
    :class:`~batchfit.train.options.TrainerOptions` (pass them as keywords, or ``options=``);
    Python objects — ``lr_schedule``, ``callbacks``, ``metrics``, ``loss_count``,
    ``transform`` — are arguments of their own. See the README for every option.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn | None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr_schedule: Callable[[int], float] | torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: Sequence[Callback] = (),
        metrics: dict[str, Metric] | None = None,
        loss_count: Callable[[Batch], Any] | None = None,
        transform: Callable[[Batch], Batch] | None = None,
        shard: ShardPolicy | None = None,
        options: TrainerOptions | None = None,
        **option_values: Any,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise expected("model", "a torch.nn.Module", type(model).__name__)
        self.can_train = optimizer is not None  # without an optimizer: evaluate and predict only
        if optimizer is None:  # a placeholder that never steps, so that everything else stays as it is
            params = [p for p in model.parameters()] or [torch.nn.Parameter(torch.zeros(0))]
            optimizer = torch.optim.SGD(params, lr=0.0)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise expected("optimizer", "a torch.optim.Optimizer", type(optimizer).__name__)
        if loss_fn is not None and not callable(loss_fn):
            raise expected("loss_fn", "a callable (output, target) -> loss, or None", loss_fn)
        check_objects(model, optimizer, lr_schedule, callbacks, metrics, loss_count, transform)
        check_shard(shard)
        self.options = o = options_from(options, option_values)

        self.device = resolve_device(o.device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.module = model.to(self.device)
        if o.gradient_checkpointing:
            logger.info("gradient checkpointing: %s", enable_gradient_checkpointing(self.module))
        self.model: torch.nn.Module = self.module
        self._carrier: distributed.GradientCarrier | None = None
        self.sharded = self.dist.enabled and o.strategy == "fsdp"  # the weights are split over the ranks
        if self.sharded:  # fully_shard wraps the module in place: self.model is self.module
            logger.info("fsdp: sharded %s and the root", shard_model(self.module, optimizer, shard) or "no blocks")
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Under DDP the per-step agreement rides in the gradient all-reduce, as a parameter's gradient.
            self._carrier = distributed.GradientCarrier(self.module, self.dist.world_size)
            self.model = DistributedDataParallel(self._carrier.slot, device_ids=ids)
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self._given_loss_fn = loss_fn  # as passed; self.loss_fn may be it adapted to the data's targets
        self.callbacks = list(callbacks)
        self.loss_count = loss_count
        self.transform = transform
        self.checkpoint_dir = o.checkpoint_dir
        self.progress = bool(o.progress) and self.dist.is_main
        self.lr = LRControl(optimizer, o, lr_schedule)
        self.evaluator = Evaluator(self.module, loss_fn, self.device, o.precision, self.resolved_eval_size,
                                   o.eval_batch_size, loss_count, dict(metrics or {}), collective=self.sharded)

        self.history = History()
        self.step = 0  # completed weight updates
        self.samples_seen = 0
        self.skipped_steps = 0
        self.stop_training = False
        self.batcher: Batcher | None = None
        self.step_fn: Step | None = None
        self.plan: BatchPlan | None = None
        self.noise_tracker: NoiseScaleTracker | None = None
        self.signals = SignalGuard()
        self._agreement: distributed.StepAgreement | None = None
        self._agreed_signal: int | None = None  # a signal some rank received, known to all (distributed)
        self._elapsed_before = 0.0
        self._start: float | None = None
        self._checked = 0  # steps whose losses have been checked for NaN
        self._fingerprint = ""  # of the training data (see data.sources.fingerprint)
        self._feed: Feed | None = None  # what the current (or last) fit trains on
        self._skipped: list[Path] = []  # unreadable checkpoints newer than the one resumed

    @property
    def base_lrs(self) -> list[float]:
        """The lrs of the optimizer's groups that scaling, warm-up and schedules multiply."""
        return self.lr.base_lrs

    @base_lrs.setter
    def base_lrs(self, value: list[float]) -> None:
        self.lr.base_lrs = list(value)
        self.lr.invalidate()

    @property
    def resolved_micro_batch_size(self) -> int | None:
        """The micro-batch size in use (``None``: each rank's share of a batch at once)."""
        return None if self.plan is None else self.plan.micro_batch_size

    # ------------------------------------------------------------------ public API
    def fit(self, train: Any, epochs: int = 1, val: Any = None, resume: bool | str = False, *,
            max_steps: int | None = None, until: Any = None) -> History:
        """Train ``epochs`` more epochs and return the history (also of earlier calls).

        ``train``/``val`` are sources, tuples of arrays or map-style datasets. A second call
        continues with the next epochs (and their sample orders). With ``resume=True``,
        ``epochs`` counts from the start of the run instead, and training continues from the
        newest readable checkpoint in ``checkpoint_dir`` (or starts fresh when there is none):
        running the same command again after a crash finishes the same run, with the weights
        of a run that was never interrupted. A checkpoint of other data (its fingerprint differs),
        another model, optimizer or setting is refused before anything is loaded;
        ``resume="force"`` resumes on other data all the same.

        One run at a time may use a ``checkpoint_dir``: a second live run is refused. A measured
        batch plan (``"auto"``, ``"adaptive"``, ``micro_batch_size="auto"``) is saved as a step-0
        checkpoint before the first step, so that a run killed before its first checkpoint
        resumes with the same plan.

        ``train`` may be a :class:`~batchfit.StreamSource`: then ``epochs`` means nothing, and
        training runs until the stream ends, ``max_steps`` steps (more in this call; with
        ``resume=True`` in the whole run), ``until`` (seconds of this call, or a callable
        ``until(trainer) -> bool`` asked before each batch) or SIGTERM/SIGINT; events are
        acknowledged only after a checkpoint that includes their updates (see :mod:`.stream_loop`).
        """
        if not self.can_train:
            raise expected("optimizer", "a torch.optim.Optimizer to train with (this Trainer was made without one: "
                           "it evaluates and predicts only)", None)
        check_resume(resume, self.checkpoint_dir)
        stream = isinstance(train, StreamSource)
        if stream:
            check_stream_fit(self.options, max_steps, until)
        else:
            if max_steps is not None or until is not None:
                raise expected("train", "a bf.streams.StreamSource when max_steps or until is given",
                               type(train).__name__)
            check_positive_int("epochs", epochs, allow_zero=True)
            train = as_source(train, "train")
        val_src = None if val is None else as_source(val, "val")
        first_epoch = self.batcher.epoch if self.batcher is not None and not resume else 0
        try:
            with session(self.dist, self.checkpoint_dir, self._all_ranks_raise):
                found = self._find_checkpoint() if resume else None
                saved = None if found is None else found[0]
                feed: Feed
                if stream:
                    feed = StreamFeed(self, train, max_steps, until, resume=bool(resume))
                else:
                    total = epochs if resume else first_epoch + epochs
                    feed = EpochFeed(self, self._prepare(train, saved), first_epoch, total)
                self._feed = feed
                if found is not None:
                    self._resume(*found, check_data=resume != "force")
                else:
                    feed.start_fresh()
                if resume and not self.dist.all_equal(self.step):
                    raise DistributedError(f"rank {self.dist.rank}: the ranks resumed from checkpoints of different "
                                           f"steps (this one: step {self.step}); every rank must see the same "
                                           f"checkpoint_dir (a shared folder)")
                with self.signals.installed(self.checkpoint_dir is not None):
                    self._run(feed, val_src)
        finally:
            if not stream and self.batcher is not None:
                self.batcher.close()  # worker processes kept between epochs end with the run
        return self.history

    def evaluate(self, data: Any, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss over ``data`` (and accuracy for class-index targets, and user metrics).

        This process evaluates all of ``data`` by itself (no collectives), so in a distributed run
        any rank may call it, alone or with the others.
        """
        src = as_source(data, "data")
        if self._feed is None:  # a model evaluated before (or without) training: outputs and targets checked
            self._check_loss(src)
        return self.evaluator.evaluate(src, batch_size)

    def predict(self, data: Any, batch_size: int | None = None, *, targets: bool = True) -> torch.Tensor:
        """Model outputs for every sample of ``data`` in order, concatenated on the CPU.

        ``data`` follows the training conventions: a single array is the input; a tuple's last
        element is a target and is not passed to the model, unless ``targets=False`` (a model of
        several inputs: every element is an input); a dict is passed as ``model(**batch)``.
        """
        if not isinstance(targets, bool):
            raise expected("targets", "True or False", targets)
        return self.evaluator.predict(as_source(data, "data"), batch_size, targets)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimizer, counters, RNGs, history, callbacks — and what
        the data set or stream it trains on needs (position, config; see the feeds).

        With ``strategy="fsdp"`` the weights and optimizer state are those of
        :func:`torch.distributed.checkpoint.state_dict.get_state_dict` (this rank's shards, keyed by
        parameter names), what a sharded checkpoint saves through ``torch.distributed.checkpoint``.
        """
        if self.options.strategy == "fsdp":
            return {**self._trainer_state(), **sharded.tensor_state(self.module, self.optimizer)}
        return {**self._trainer_state(), "model": model_state(self.module), "optimizer": self.optimizer.state_dict()}

    def _trainer_state(self) -> dict[str, Any]:
        """:meth:`state_dict` but the weights and the optimizer state."""
        assert self._feed is not None and self.step_fn is not None
        scaler = self.step_fn.scaler
        return {
            "format": 1,
            "optimizer_groups": [len(group["params"]) for group in self.optimizer.param_groups],
            "scaler": None if scaler is None else scaler.state_dict(),
            "lr_scheduler": self.lr.state_dict(),
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(),
            "history": self.history.state_dict(),
            "elapsed": self._elapsed(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "world_size": self.dist.world_size,
            **self._feed.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the trainer must be prepared for the same data)."""
        assert self._feed is not None and self.step_fn is not None
        if sharded.SHARDED_KEY in state:  # a sharded checkpoint: the tensors are read from its folder now
            sharded.load_tensors(state[sharded.SHARDED_KEY], self.module, self.optimizer)
        else:
            load_model_state(self.module, state["model"], "checkpoint")
            self.optimizer.load_state_dict(state["optimizer"])
        if self.step_fn.scaler is not None and state["scaler"] is not None:
            self.step_fn.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.history.load_state_dict(state["history"])
        self._checked = self.history.total
        self._elapsed_before = float(state["elapsed"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        self._feed.load_state_dict(state)
        self.lr.load_state_dict(state.get("lr_scheduler"))
        set_rng_state(state["rng"])
        self.lr.invalidate()  # re-applied before the next step

    def save_checkpoint(self) -> str | None:
        """Write a checkpoint now (rank 0 writes it); returns its path (``None`` on other ranks).

        Training on a stream, the events the checkpoint includes are acknowledged once it is durable.
        """
        if self.checkpoint_dir is None:
            raise expected("checkpoint_dir", "a folder to save checkpoints in", None)
        if self._feed is None:
            raise InputError("save_checkpoint() saves a run: call fit() first (a checkpoint holds the position in "
                                "the data, which only fit() knows)")
        self._check_losses()
        self._feed.before_checkpoint()
        path = None
        if self.options.strategy == "fsdp":  # every rank writes its shard
            trainer_state = self._trainer_state() if self.dist.is_main else {}
            written = sharded.save_sharded(trainer_state, self.module, self.optimizer, self.checkpoint_dir,
                                           self.step, self.options.keep_checkpoints, self.dist)
            path = None if written is None else os.fspath(written)
        elif self.dist.is_main:
            path = os.fspath(ckpt.save_checkpoint(self.state_dict(), self.checkpoint_dir, self.step,
                                                  self.options.keep_checkpoints))
        self._feed.after_checkpoint()
        return path

    def save(self, path: str | os.PathLike[str] | None) -> Path | None:
        """Write the trained model's weights and this run's configuration to ``path`` (load with ``bf.load_model``).

        A sharded model (``strategy="fsdp"`` on several ranks) is gathered first: every rank calls
        ``save``, and rank 0 writes one ordinary file (the other ranks' ``path`` may be ``None``;
        they return ``None``).
        """
        config = self._feed.config() if self._feed is not None else dataclasses.asdict(self.options)
        if self.sharded:
            state = full_model_state(self.module)  # a collective: on every rank, the whole weights on rank 0
            if not self.dist.is_main:
                return None
            if path is None:
                raise expected("path", "a file to write the model to (on rank 0)", None)
            return save_model(self.module, path, config, state=state)
        if path is None:
            raise expected("path", "a file to write the model to", None)
        return save_model(self.module, path, config)

    def announce(self, message: str) -> None:
        """Tell the user about a decision (resume, early stop, a measured size): shown under the progress
        bar when ``progress`` is on, and logged to the ``batchfit`` logger always (the record marked
        ``shown``, so that a console handler such as the ``batchfit`` command's prints it once)."""
        logger.info(message, extra={"shown": self.progress})
        if self.progress:
            Progress.write(message)

    def resolved_eval_size(self) -> int:
        """The micro-batch size used for training, as a default evaluation batch size."""
        micro = self.resolved_micro_batch_size
        if micro is not None:
            return micro
        return self.batcher.batch_size if self.batcher is not None else 256

    # ------------------------------------------------------------------ setup
    def _prepare(self, src: Source, saved: dict[str, Any] | None = None) -> Batcher:
        """Resolve the batch plan for ``src`` and build the batcher and the step for it."""
        o = self.options
        described = self._check_loss(src)
        self.plan = plan = plan_batches(o, self.module, self.loss_fn, self.optimizer, src, self.device, self.dist,
                                        self.lr.base_lrs, saved)
        if plan.choice is not None:
            choice = plan.choice
            self.announce(f"batch_size={o.batch_size!r}: {plan.batch_size} (noise scale {choice.b_simple:.4g}, "
                          f"probe {choice.probe_seconds:.2f} s; history.events has the evidence)")
            self.history.add_event(step=self.step, kind="batch_size", batch_size=plan.batch_size,
                                   reason=choice.reason, b_simple=choice.b_simple,
                                   throughput={str(k): v for k, v in choice.throughput.items()},
                                   probe_seconds=choice.probe_seconds, lr_cap=choice.lr_cap)
        self._fingerprint = fingerprint(src)
        if o.micro_batch_size == "auto":
            fits = "the whole batch" if plan.micro_batch_size is None else f"{plan.micro_batch_size} samples"
            self.announce(f"micro_batch_size='auto': {fits} fit in memory (batch_size stays {plan.batch_size})")
        if o.micro_batch_tokens == "auto":
            self.announce(f"micro_batch_tokens='auto': {plan.micro_batch_tokens} padded tokens a micro-batch "
                          f"fit in memory (batch_size stays {plan.batch_size})")
        self.batcher = Batcher(src, plan.batch_size, o.shuffle, o.drop_last, o.seed, self.dist.rank,
                               self.dist.world_size, pin_memory=self.device.type == "cuda", prefetch=o.prefetch,
                               transform=self.transform, workers=o.workers, batch_tokens=o.batch_tokens)
        self.step_fn = Step(self.model, self.loss_fn, self.optimizer, device=self.device, precision=o.precision,
                            micro_batch_size=plan.micro_batch_size, micro_batch_tokens=plan.micro_batch_tokens,
                            max_grad_norm=o.max_grad_norm, world_size=self.dist.world_size,
                            loss_count=self.loss_count, sum_over_ranks=self.dist.sum_later)
        self._tell_plan(src, described, plan, self.batcher)
        self._agreement = (distributed.StepAgreement(self.dist, self.device, self._carrier) if self.dist.enabled
                           else None)
        if plan.adaptive is not None:
            self.noise_tracker = plan.adaptive.tracker
        elif o.tracks_noise:
            self.noise_tracker = NoiseScaleTracker(beta=0.95)
        self.lr.tracker = self.noise_tracker
        self.lr.start_batch = None if plan.adaptive is None else plan.adaptive.start
        self.lr.rule_cap = math.inf if plan.choice is None else plan.choice.lr_cap
        self.lr.begin(plan.batch_size)
        return self.batcher

    def _check_loss(self, src: Source) -> str:
        """Output, target and loss checked on two samples (one forward); the loss adapted where Keras would.
        Returns the data's shapes and dtypes, in words."""
        check_lengths(self.module, src)
        self.loss_fn, described = check_first_batch(self.module, self._given_loss_fn, src, self.transform,
                                                    self.device, self.announce, self.options.precision)
        self.evaluator.loss_fn = self.loss_fn
        return described

    def _tell_plan(self, src: Source, described: str, plan: BatchPlan, batcher: Batcher) -> None:
        """The run's summary (with the progress bar only), and a warning where micro-batches change the result."""
        if self.progress:
            self.announce(summary(self.module, self.optimizer, src, described, plan.batch_size,
                                  plan.micro_batch_size, len(batcher), self.device))
        split = plan.micro_batch_size is not None or plan.micro_batch_tokens is not None
        if split:
            found = batch_dependent(self.module)
            if found:
                how = (f"micro_batch_size={plan.micro_batch_size}" if plan.micro_batch_size is not None
                       else f"micro_batch_tokens={plan.micro_batch_tokens}")
                names = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
                logger.warning("%s splits each batch of %d, and the model has modules that normalise by the "
                               "batch's statistics (%s): each piece is normalised by its own, so the outputs, "
                               "gradients and running statistics differ from one whole batch's. Splitting keeps "
                               "the result only for models without batch statistics: use GroupNorm or LayerNorm, "
                               "or train without micro-batches", how, plan.batch_size, names)

    def _find_checkpoint(self) -> tuple[dict[str, Any], Any] | None:
        assert self.checkpoint_dir is not None
        skipped: list[Path] = []
        found = self._load_latest(skipped)
        self._skipped = skipped
        if found is None and skipped:
            names = ", ".join(p.name for p in skipped)
            raise CheckpointError(f"every checkpoint in {self.checkpoint_dir} is unreadable ({names}); resume=True "
                                  f"does not start over in their place. To start fresh, move them away (or use "
                                  f"another checkpoint_dir), or call fit(resume=False)")
        if found is None:
            logger.info("no checkpoint in %s: starting fresh", self.checkpoint_dir)
        return found

    def _load_latest(self, skipped: list[Path]) -> tuple[dict[str, Any], Any] | None:
        """The newest readable checkpoint: sharded folders with ``strategy="fsdp"``, else files (the
        unreadable files passed over are appended to ``skipped``)."""
        assert self.checkpoint_dir is not None
        fsdp = self.options.strategy == "fsdp"
        found = sharded.load_latest_sharded(self.checkpoint_dir) if fsdp else \
            ckpt.load_latest(self.checkpoint_dir, skipped=skipped)
        other = ckpt.list_checkpoints(self.checkpoint_dir) if fsdp else sharded.list_sharded(self.checkpoint_dir)
        if found is None and other:
            raise CheckpointError(f"{self.checkpoint_dir} holds checkpoints of strategy="
                                  f"{'ddp' if fsdp else 'fsdp'!r} ({other[0].name}), which this run "
                                  f"(strategy={self.options.strategy!r}) cannot read: use the same strategy, "
                                  f"or another checkpoint_dir")
        return found

    def _resume(self, state: dict[str, Any], path: Any, check_data: bool = True) -> None:
        """Load a checkpoint, after checking all of it fits this run (nothing is changed when it does not)."""
        assert self._feed is not None
        self._feed.check(state, path)
        if sharded.SHARDED_KEY in state:
            sharded.check_fits_sharded(state, self.module, self.optimizer, path)
        else:
            ckpt.check_fits(state, self.module, self.optimizer, path)
        keys = tuple(k for k in self._feed.resume_keys if check_data or k != "data_fingerprint")
        ckpt.check_compatible(state.get("config", {}), self._feed.config(), keys, path)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {error}") from error
        if self._skipped:  # newer checkpoints were unreadable: what they held must not be lost
            self._feed.fell_back(state, path, self._skipped)
        self.announce(f"Resumed from {path} at step {self.step} ({self._feed.resumed_at()})")
        finished = self._feed.nothing_left()
        if finished is not None:
            self.announce(finished)

    # ------------------------------------------------------------------ the loop
    def _run(self, feed: Feed, val: Source | None) -> None:
        """The epochs (a stream: this fit's pass over it), with the callbacks' hooks around them."""
        progress = Progress(self.progress, epochs_only=self.options.progress == "epochs")
        hooks = {name: overriding(self.callbacks, name) for name in HOOKS}
        self.stop_training = False  # before on_fit_begin, so that a callback can stop at once
        self._agreed_signal = None
        for hook in hooks["on_fit_begin"]:
            hook(self)
        self.module.train()
        self._start = time.perf_counter()
        while feed.more():
            epoch, steps_before = feed.epoch, self.step
            for hook in hooks["on_epoch_begin"]:
                hook(self, epoch)
            try:
                self._run_steps(feed, epoch, progress, hooks, val)
            except (IndexError, RuntimeError, TypeError) as error:
                replacement = error_at_step(error, self.step + 1, epoch)
                if replacement is error:
                    raise
                raise replacement from error
            feed.end_steps()  # batches fetched ahead but not trained on are not counted
            if self._pending_signal() is not None:
                self._exit_on_signal()
            if not feed.epoch_done():
                break  # stopped early inside the epoch
            record = self._end_epoch(feed, epoch, val, progress)
            if self.step > steps_before or not feed.open_ended:  # a fit without a step has no loss to judge
                self.lr.after_epoch(record)
            feed.next_epoch()
            for hook in hooks["on_epoch_end"]:
                hook(self, epoch, record)
            if self.checkpoint_dir is not None:
                self.save_checkpoint()
            else:
                feed.release()
        self._check_losses()
        for hook in hooks["on_fit_end"]:
            hook(self, self.history)

    def _run_steps(self, feed: Feed, epoch: int, progress: Progress, hooks: dict[str, list[Any]],
                   val: Source | None) -> None:
        """One epoch's steps, each in the algorithm's order: THE step, then its bookkeeping (:class:`AfterStep`)."""
        lr, optimizer, step_begin, signals = self.lr, self.optimizer, hooks["on_step_begin"], self.signals
        distributed = self.dist.enabled
        after = AfterStep(self, feed, epoch, progress, hooks, val)
        for batch, mark in feed.batches():
            size = mark.batch_size
            stop_requested = self.stop_training  # asked for after the previous step
            for hook in step_begin:
                hook(self, self.step)
            if lr.dynamic:
                lr.apply(self.step, feed.lr_batch_size(size))
            used_lr = optimizer.param_groups[0]["lr"]  # whoever set it: a schedule, scheduler or callback
            result = feed.step(batch, size, stop_requested)  # forward, backward, sync, check, update
            if result.stop:
                break  # a rank asked to stop after the previous step: every rank drops this one
            if result.empty:
                continue  # a stream batch whose every event was quarantined: no step
            if not result.applied:
                self._non_finite(result.value, epoch, feed, mark, batch)
                continue
            after(batch, mark, result, used_lr)
            if distributed:
                if self._agreed_signal is not None:
                    break  # stop requests are agreed at the next step
            elif self.stop_training or signals.received is not None:
                break
        after.finish()

    def _validate_now(self, epoch: int, val: Source) -> None:
        """Validation in the middle of an epoch (``val_every``), recorded in ``history.validations``."""
        metrics = self.evaluator.validate(val, self.dist)
        record = {"step": self.step, "epoch": epoch, "samples": self.samples_seen, "seconds": self._elapsed(),
                  **{f"val_{k}": v for k, v in metrics.items()}}
        self.history.validations.append(record)
        self.module.train()

    def _end_epoch(self, feed: Feed, epoch: int, val: Source | None, progress: Progress) -> dict[str, Any]:
        """The epoch's record in ``history.epochs``: its loss and the feed's columns, validation metrics."""
        self._check_losses()
        own = feed.epoch_record(epoch)
        record: dict[str, Any] = {"epoch": epoch, "loss": own.pop("loss"), "steps": self.step,
                                  "samples": self.samples_seen, "seconds": self._elapsed(), **own}
        if val is not None:
            record.update({f"val_{k}": v for k, v in self.evaluator.validate(val, self.dist).items()})
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        self.history.epochs.append(record)
        progress.end_epoch(record)
        return record

    # ------------------------------------------------------------------ stops and guards
    def note_signal(self, any_rank: bool) -> None:
        """Distributed: a rank received SIGTERM/SIGINT, as every rank learnt at the same step."""
        if any_rank and self._agreed_signal is None:
            # Another rank's signal acts as SIGTERM here.
            self._agreed_signal = self.signals.received or signal.SIGTERM

    def stop_between_epochs(self) -> bool:
        """Whether to stop before the next epoch; in a distributed run, whether any rank asked to."""
        if self._agreement is None:
            if self.signals.received is not None:  # during the epoch's end (validation, callbacks, checkpoint)
                self._exit_on_signal()
            return self.stop_training
        self._agreement.start(None, None, self.stop_training, self.signals.received is not None)
        agreed = self._agreement.finish()
        self.note_signal(agreed.signal)
        self.stop_training = agreed.stop
        if self._agreed_signal is not None:
            self._exit_on_signal()
        return self.stop_training

    def _pending_signal(self) -> int | None:
        """The signal to stop for: this process's, or in a distributed run the one all ranks agreed on."""
        return self._agreed_signal if self.dist.enabled else self.signals.received

    def _all_ranks_raise(self, error: BaseException) -> bool:
        """Whether every rank raises ``error`` at the same point (nothing to abort): a NaN loss, or a signal."""
        if isinstance(error, NonFiniteLossError):
            return True
        return isinstance(error, (SystemExit, KeyboardInterrupt)) and self._agreed_signal is not None

    def _check_losses(self) -> None:
        """Read back pending losses and raise on the first non-finite one (on_nan='raise')."""
        self._checked = check_losses(self.history, self._checked)

    def _non_finite(self, value: float | None, epoch: int, feed: Feed, mark: Any, batch: Any = None) -> None:
        """A step whose loss is NaN/inf: raise, or skip its batch (after rolling back, with on_nan='rollback').

        The batch's data is checked first (only now, when the loss went bad): NaN or inf in the
        inputs or targets is what the error names then, with the samples, not the learning rate.
        """
        assert value is not None
        step = self.step + 1
        data = None if batch is None else non_finite_data(batch, sample_ids(feed, mark))
        if self.options.on_nan == "raise":
            raise non_finite_error(value, step, epoch, data, self.dist.world_size)
        if data:
            logger.warning("step %d (epoch %d): %s", step, epoch, data)
        self.skipped_steps += 1
        feed.skipped(mark)  # the batch is used up: a checkpoint continues after it
        if self.options.on_nan == "rollback":
            found = self._load_latest([]) if self.checkpoint_dir else None
            if not self.dist.all_equal(-1 if found is None else int(found[0]["step"])):
                raise DistributedError(f"rank {self.dist.rank}: the ranks found different checkpoints to roll back "
                                       f"to; every rank must see the same checkpoint_dir (a shared folder)")
            if found is not None:
                skipped = self.skipped_steps  # counts this skip, which the checkpoint does not know
                self.load_state_dict(found[0])
                feed.skipped(mark)  # continue after the offending batch
                self.skipped_steps = skipped
                logger.warning("non-finite loss at step %d (epoch %d): rolled back to %s and skipped the batch",
                               step, epoch, found[1])
                return
        logger.warning("non-finite loss at step %d (epoch %d): skipped the update (%d skipped so far)",
                       step, epoch, self.skipped_steps)

    def _elapsed(self) -> float:
        start = self._start
        return self._elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    def _exit_on_signal(self) -> None:
        """Save a checkpoint (with a ``checkpoint_dir``) and exit as the signal asks."""
        signum = self._pending_signal()
        assert signum is not None
        self.signals.received = None
        path = self.save_checkpoint() if self.checkpoint_dir is not None else None
        if self.dist.is_main:  # the rank that wrote the checkpoint
            logger.warning("received %s: saved %s and stopped", signal.Signals(signum).name, path)
        raise exit_for(signum)


def sample_ids(feed: Feed, mark: Any) -> Any:
    """The data set's indices of the batch that ended at ``mark`` (one process, batches of samples), else ``None``."""
    batcher = getattr(feed, "batcher", None)
    if not isinstance(feed, EpochFeed) or batcher is None or batcher.world_size != 1 \
            or batcher.batch_tokens is not None:
        return None
    done = int(mark.samples_done)
    return batcher.order()[done - int(mark.batch_size): done]


class AfterStep:
    """The bookkeeping after each update of one epoch, in this order: the lr scheduler, the counters, the
    history (with the feed's own columns), ``on_step_end``, validation (``val_every``), the loggers'
    ``on_log`` (every ``LOG_EVERY`` seconds), a checkpoint (``checkpoint_every``) and the progress bar."""

    def __init__(self, trainer: Trainer, feed: Feed, epoch: int, progress: Progress, hooks: dict[str, list[Any]],
                 val: Source | None) -> None:
        self.trainer, self.feed, self.epoch, self.progress, self.val = trainer, feed, epoch, progress, val
        self.step_end, self.log_hooks = hooks["on_step_end"], hooks["on_log"]
        self.history = trainer.history
        self.per_step_scheduler = trainer.lr.scheduler is not None
        self.checkpoint_every = trainer.options.checkpoint_every
        # Seconds between checkpoints: the option, or a stream's default when it has a folder and no interval.
        self.checkpoint_seconds = trainer.options.checkpoint_seconds
        if (self.checkpoint_seconds is None and self.checkpoint_every is None and feed.open_ended
                and trainer.checkpoint_dir is not None):
            self.checkpoint_seconds = STREAM_CHECKPOINT_SECONDS
        self.val_every = trainer.options.val_every if val is not None else None
        self.start_samples, self.start_time = trainer.samples_seen, time.perf_counter()
        self.next_log = self.start_time + LOG_EVERY
        seconds = self.checkpoint_seconds
        self.next_checkpoint = math.inf if seconds is None else self.start_time + seconds
        self.done = feed.start_epoch(progress, self.start_time)  # steps of this epoch already done (a resume)
        self.last_lr = math.nan

    def __call__(self, batch: Any, mark: Mark, result: StepResult, used_lr: float) -> None:
        trainer, size = self.trainer, mark.batch_size
        if self.per_step_scheduler:
            trainer.lr.after_update()
        trainer.step += 1
        trainer.samples_seen += size
        self.done += 1
        self.last_lr = used_lr
        columns = self.feed.columns(batch, mark, result)
        now = time.perf_counter()
        self.history.add_step(trainer.step, self.epoch, trainer.samples_seen, size,
                              result.loss if result.value is None else result.value, used_lr,
                              trainer._elapsed_before + now - trainer._start, **columns)  # type: ignore[operator]
        if self.step_end:
            trainer._check_losses()
            record = self.history.record(-1)
            for hook in self.step_end:
                hook(trainer, record)
        if self.val_every is not None and trainer.step % self.val_every == 0:
            trainer._validate_now(self.epoch, self.val)  # type: ignore[arg-type]
        if self.log_hooks and now >= self.next_log:
            trainer._check_losses()
            for hook in self.log_hooks:
                hook(trainer)
            self.next_log = now + LOG_EVERY
        every = self.checkpoint_every
        if every is not None and trainer.step % every == 0 or now >= self.next_checkpoint:
            trainer.save_checkpoint()
            if self.checkpoint_seconds is not None:
                self.next_checkpoint = time.perf_counter() + self.checkpoint_seconds
        if self.progress.due(now):
            self.show(now)

    def show(self, now: float) -> None:
        """Refresh the progress bar: steps done in the epoch, samples/s, the feed's loss, the lr."""
        self.trainer._check_losses()
        rate = (self.trainer.samples_seen - self.start_samples) / max(now - self.start_time, 1e-9)
        self.progress.refresh(now, self.done, rate, self.feed.shown_loss(), self.last_lr, self.feed.shown_note())

    def finish(self) -> None:
        """After the epoch's steps: an open-ended bar (a stream has no total) shows its last state."""
        if self.feed.open_ended and self.trainer.samples_seen > self.start_samples:
            self.show(time.perf_counter())


def _signature() -> inspect.Signature:
    """``Trainer.__init__``'s signature with every option as a keyword, for ``help()`` and editors."""
    own = inspect.signature(Trainer.__init__)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(TrainerOptions)]
    return own.replace(parameters=params)


Trainer.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
