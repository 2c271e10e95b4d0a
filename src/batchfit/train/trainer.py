"""The Trainer: the mini-batch loop, from data to updated weights, epoch after epoch.

The loop itself is here; its collaborators each do one job: the options (:mod:`.options`),
the batch plan resolved once (:mod:`.plan`), THE step (:class:`~batchfit.core.step.Step`),
the learning rate as a function of step and batch size (:mod:`.lr_control`), evaluation
(:mod:`.evaluation`), the NaN and signal guards (:mod:`.guards`), checkpoint files
(:mod:`.checkpoint`) and the per-step agreement of a distributed run
(:class:`~batchfit.distributed.StepAgreement`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..core.batch import Batch, LossFn, param_dtype
from ..core.device import resolve_device
from ..core.recompute import enable_gradient_checkpointing
from ..core.rng import rng_state, set_rng_state
from ..core.step import NoiseSample, Step
from ..data.batcher import Batcher, Position
from ..data.prefetch import device_prefetch
from ..data.sources import Source, as_source, fingerprint
from ..data.streams import StreamSource
from ..errors import BatchfitError, CheckpointError, DistributedError, NonFiniteLossError, check_positive_int, expected
from ..measure.noise import NoiseScaleTracker
from . import checkpoint as ckpt
from .callbacks import HOOKS, Callback, overriding
from .checks import check_objects, error_at_step, options_from
from .evaluation import Evaluator
from .guards import SignalGuard, check_losses, exit_for, non_finite_error
from .history import History
from .lr_control import LRControl
from .metrics import Metric
from .options import NOISE_EVERY, RESUME_KEYS, TrainerOptions
from .plan import BatchPlan, plan_batches
from .progress import Progress
from .saving import load_model_state, model_state, save_model
from .stream_loop import fit_stream

logger = logging.getLogger("batchfit")
# Seconds between two calls of the callbacks' on_log (loggers), each after one readback of the losses.
LOG_EVERY = 2.0


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
        optimizer: torch.optim.Optimizer,
        *,
        lr_schedule: Callable[[int], float] | torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: Sequence[Callback] = (),
        metrics: dict[str, Metric] | None = None,
        loss_count: Callable[[Batch], Any] | None = None,
        transform: Callable[[Batch], Batch] | None = None,
        options: TrainerOptions | None = None,
        **option_values: Any,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise expected("model", "a torch.nn.Module", type(model).__name__)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise expected("optimizer", "a torch.optim.Optimizer", type(optimizer).__name__)
        if loss_fn is not None and not callable(loss_fn):
            raise expected("loss_fn", "a callable (output, target) -> loss, or None", loss_fn)
        check_objects(model, optimizer, lr_schedule, callbacks, metrics, loss_count, transform)
        self.options = o = options_from(options, option_values)

        self.device = resolve_device(o.device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.module = model.to(self.device)
        if o.gradient_checkpointing:
            logger.info("gradient checkpointing: %s", enable_gradient_checkpointing(self.module))
        self.model: torch.nn.Module = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.callbacks = list(callbacks)
        self.loss_count = loss_count
        self.transform = transform
        self.checkpoint_dir = o.checkpoint_dir
        self.progress = bool(o.progress) and self.dist.is_main
        self.lr = LRControl(optimizer, o, lr_schedule)
        self.evaluator = Evaluator(self.module, loss_fn, self.device, o.precision, self.resolved_eval_size,
                                   o.eval_batch_size, loss_count, dict(metrics or {}))

        self.history = History()
        self.step = 0  # completed weight updates
        self.samples_seen = 0
        self.skipped_steps = 0
        self.stop_training = False
        self.batcher: Batcher | None = None
        self.step_fn: Step | None = None
        self.plan: BatchPlan | None = None
        self.noise_tracker: NoiseScaleTracker | None = None
        self.position: Position | None = None  # just after the last batch trained (or skipped)
        self.signals = SignalGuard()
        self._agreement: distributed.StepAgreement | None = None
        self._agreed_signal: int | None = None  # a signal some rank received, known to all (distributed)
        self._elapsed_before = 0.0
        self._start: float | None = None
        self._checked = 0  # steps whose losses have been checked for NaN
        self._fingerprint = ""  # of the training data (see data.sources.fingerprint)

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
        if isinstance(train, StreamSource):
            return fit_stream(self, train, max_steps=max_steps, until=until, val=val, resume=resume)
        if max_steps is not None or until is not None:
            raise expected("train", "a bf.StreamSource when max_steps or until is given", type(train).__name__)
        check_positive_int("epochs", epochs, allow_zero=True)
        if resume not in (False, True, "force") or isinstance(resume, int) and not isinstance(resume, bool):
            raise expected("resume", "False, True or 'force'", resume)
        if resume and self.checkpoint_dir is None:
            raise expected("checkpoint_dir", "a folder when resume=True", None)
        src = as_source(train, "train")
        val_src = None if val is None else as_source(val, "val")
        first_epoch = self.batcher.epoch if self.batcher is not None and not resume else 0
        lock = ckpt.FolderLock(self.checkpoint_dir) if self.checkpoint_dir is not None and self.dist.is_main else None
        try:
            if lock is not None:
                lock.acquire()
            found = self._find_checkpoint() if resume else None
            batcher = self._prepare(src, None if found is None else found[0])
            if found is not None:
                self._resume(*found, check_data=resume != "force")
            else:
                batcher.set_epoch(first_epoch)
                if self.checkpoint_dir is not None and self._measured_plan():
                    self.save_checkpoint()  # the measured plan is part of the run from now on
            if resume and not self.dist.all_equal(self.step):
                raise DistributedError(f"rank {self.dist.rank}: the ranks resumed from checkpoints of different "
                                       f"steps (this one: step {self.step}); every rank must see the same "
                                       f"checkpoint_dir (a shared folder)")
            total = epochs if resume else first_epoch + epochs
            if found is not None and batcher.epoch >= total:
                self.announce(f"The run in {self.checkpoint_dir} had already finished {batcher.epoch} of {total} "
                              f"epochs: nothing to train (raise `epochs`, or use another checkpoint_dir for a new run)")
            with self.signals.installed(self.checkpoint_dir is not None):
                self._run(total, val_src)
        except BaseException as error:
            if not self.dist.enabled or self._all_ranks_raise(error):
                raise
            # Leave the process group now, so that the other ranks stop at once instead of waiting
            # for this one until the timeout; an error caused by another rank becomes a DistributedError.
            replacement = self.dist.abort(error)
            if replacement is None:
                raise
            # The failed collective's own traceback (C++ frames) says nothing more than the first line
            # the replacement quotes.
            raise replacement from None
        finally:
            if lock is not None:
                lock.release()
            if self.batcher is not None:
                self.batcher.close()  # worker processes kept between epochs end with the run
        return self.history

    def evaluate(self, data: Any, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss over ``data`` (and accuracy for class-index targets, and user metrics).

        This process evaluates all of ``data`` by itself (no collectives), so in a distributed run
        any rank may call it, alone or with the others.
        """
        return self.evaluator.evaluate(as_source(data, "data"), batch_size)

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
        """Everything a resumed run needs: weights, optimizer, position, RNGs, history, config."""
        assert self.batcher is not None and self.step_fn is not None and self.plan is not None
        scaler, adaptive = self.step_fn.scaler, self.plan.adaptive
        return {
            "format": 1,
            "model": model_state(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "batcher": self.batcher.state_dict(self.position),
            "rng": rng_state(),
            "history": self.history.state_dict(),
            "elapsed": self._elapsed(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": self._config(),
            "world_size": self.dist.world_size,
            "noise_tracker": None if self.noise_tracker is None else self.noise_tracker.state_dict(),
            "adaptive": None if adaptive is None else adaptive.state_dict(),
            "lr_scheduler": self.lr.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the trainer must be prepared for the same data)."""
        assert self.batcher is not None and self.step_fn is not None and self.plan is not None
        load_model_state(self.module, state["model"], "checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.step_fn.scaler is not None and state["scaler"] is not None:
            self.step_fn.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.skipped_steps = state["skipped_steps"]
        self.batcher.load_state_dict(state["batcher"])
        self.position = None
        self.history.load_state_dict(state["history"])
        self._checked = len(self.history)
        self._elapsed_before = state["elapsed"]
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        if self.noise_tracker is not None and state.get("noise_tracker") is not None:
            self.noise_tracker.load_state_dict(state["noise_tracker"])
        if self.plan.adaptive is not None and state.get("adaptive") is not None:
            self.plan.adaptive.load_state_dict(state["adaptive"])
            self.lr.start_batch = self.plan.adaptive.start
        self.lr.load_state_dict(state.get("lr_scheduler"))
        set_rng_state(state["rng"])
        self.lr.invalidate()  # re-applied before the next step

    def save_checkpoint(self) -> str | None:
        """Write a checkpoint now (rank 0 only); returns its path."""
        if self.checkpoint_dir is None:
            raise expected("checkpoint_dir", "a folder to save checkpoints in", None)
        if self.batcher is None:
            raise BatchfitError("save_checkpoint() saves a run: call fit() first (a checkpoint holds the position in "
                                "the data, which only fit() knows)")
        self._check_losses()
        if not self.dist.is_main:
            return None
        path = ckpt.save_checkpoint(self.state_dict(), self.checkpoint_dir, self.step, self.options.keep_checkpoints)
        return os.fspath(path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trained model's weights and this run's configuration to ``path`` (load with ``bf.load_model``)."""
        config = self._config() if self.batcher is not None else dataclasses.asdict(self.options)
        return save_model(self.module, path, config)

    def announce(self, message: str) -> None:
        """Tell the user about a decision (resume, early stop, a measured size): shown under the progress
        bar when ``progress`` is on, and logged to the ``batchfit`` logger always."""
        logger.info(message)
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
        self.plan = plan = plan_batches(o, self.module, self.loss_fn, self.optimizer, src, self.device, self.dist,
                                        self.lr.base_lrs, saved)
        if plan.choice is not None:
            choice = plan.choice
            self.announce(f"batch_size={o.batch_size!r}: {plan.batch_size} (noise scale {choice.b_simple:.4g}, "
                          f"probe {choice.probe_seconds:.2f} s; history.events has the evidence)")
            self.history.add_event(step=self.step, kind="batch_size", batch_size=plan.batch_size,
                                   reason=choice.reason, b_simple=choice.b_simple,
                                   throughput={str(k): v for k, v in choice.throughput.items()},
                                   probe_seconds=choice.probe_seconds)
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
        self._agreement = distributed.StepAgreement(self.dist, self.device) if self.dist.enabled else None
        if plan.adaptive is not None:
            self.noise_tracker = plan.adaptive.tracker
        elif o.tracks_noise:
            self.noise_tracker = NoiseScaleTracker(beta=0.95)
        self.lr.tracker = self.noise_tracker
        self.lr.start_batch = None if plan.adaptive is None else plan.adaptive.start
        self.lr.begin(plan.batch_size)
        self.position = None
        return self.batcher

    def _find_checkpoint(self) -> tuple[dict[str, Any], Any] | None:
        assert self.checkpoint_dir is not None
        found = ckpt.load_latest(self.checkpoint_dir)
        if found is None:
            logger.info("no checkpoint in %s: starting fresh", self.checkpoint_dir)
        return found

    def _measured_plan(self) -> bool:
        """Whether this fit measured its batch plan (a choice a restart must not measure again)."""
        return self.plan is not None and (self.plan.choice is not None or self.options.micro_batch_size == "auto")

    def _resume(self, state: dict[str, Any], path: Any, check_data: bool = True) -> None:
        """Load a checkpoint, after checking all of it fits this run (nothing is changed when it does not)."""
        keys = RESUME_KEYS if check_data else tuple(k for k in RESUME_KEYS if k != "data_fingerprint")
        ckpt.check_fits(state, self.module, self.optimizer, path)
        ckpt.check_compatible(state.get("config", {}), self._config(), keys, path)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {error}") from error
        assert self.batcher is not None
        self.announce(f"Resumed from {path} at step {self.step} (in epoch {self.batcher.epoch + 1})")

    def _config(self) -> dict[str, Any]:
        assert self.batcher is not None
        config = dataclasses.asdict(self.options)
        config.update(batch_size=self.batcher.batch_size, num_samples=self.batcher.num_samples,
                      micro_batch_size=self.resolved_micro_batch_size, device=str(self.device),
                      world_size=self.dist.world_size, optimizer=type(self.optimizer).__name__,
                      lrs=[float(lr) for lr in self.lr.base_lrs],
                      data_fingerprint=self._fingerprint)
        if self.options.measured_batch:
            config["batch_size"] = self.options.batch_size
        return config

    # ------------------------------------------------------------------ the loop
    def _run(self, epochs: int, val: Source | None) -> None:
        batcher, progress = self.batcher, Progress(self.progress, epochs_only=self.options.progress == "epochs")
        assert batcher is not None
        hooks = {name: overriding(self.callbacks, name) for name in HOOKS}
        self.stop_training = False  # before on_fit_begin, so that a callback can stop at once
        self._agreed_signal = None
        for hook in hooks["on_fit_begin"]:
            hook(self)
        self.module.train()
        self._start = time.perf_counter()
        while batcher.epoch < epochs and not self._stop_between_epochs():
            epoch = batcher.epoch + 1  # what users see: epochs count from 1 (the batcher's order index from 0)
            for hook in hooks["on_epoch_begin"]:
                hook(self, epoch)
            try:
                self._run_epoch(epoch, epochs, progress, hooks, val)
            except (IndexError, RuntimeError, TypeError) as error:
                replacement = error_at_step(error, self.step + 1, epoch)
                if replacement is error:
                    raise
                raise replacement from error
            assert self.position is not None
            batcher.seek(self.position)  # batches fetched ahead but not trained on are not counted
            if self._pending_signal() is not None:
                self._exit_on_signal()
            if not batcher.epoch_done:
                break  # stopped early inside the epoch
            record = self._end_epoch(epoch, val, progress)
            self.lr.after_epoch(record)
            batcher.set_epoch(epoch)  # the next one
            self.position = None
            for hook in hooks["on_epoch_end"]:
                hook(self, epoch, record)
            if self.checkpoint_dir is not None:
                self.save_checkpoint()
        self._check_losses()
        for hook in hooks["on_fit_end"]:
            hook(self, self.history)

    def _run_epoch(self, epoch: int, epochs: int, progress: Progress, hooks: dict[str, list[Any]],
                   val: Source | None = None) -> None:
        batcher, step_fn, history, lr = self.batcher, self.step_fn, self.history, self.lr
        assert batcher is not None and step_fn is not None
        every = self.options.checkpoint_every
        # Reading the loss back costs a device sync on CUDA, so on_nan="raise" checks lazily there
        # (at the next readback); on the CPU it costs nothing and the bad update is never applied.
        check_each_step = self.options.on_nan != "raise" or self.dist.enabled or self.device.type == "cpu"
        step_begin, step_end, log_hooks = hooks["on_step_begin"], hooks["on_step_end"], hooks["on_log"]
        val_every = self.options.val_every if val is not None else None
        next_log = time.perf_counter() + LOG_EVERY
        track_noise = self.noise_tracker is not None
        optimizer = self.optimizer  # (its param_groups are replaced when a rollback loads a state)
        per_step_scheduler = lr.scheduler is not None
        self.position = Position(batcher.epoch, batcher.samples_done, 0)
        start_samples, start_time = self.samples_seen, time.perf_counter()
        done_before = batcher.samples_done
        progress.start_epoch(epoch, epochs, len(batcher), -(-done_before // batcher.batch_size), start_time)
        batches_done = 0
        lr.apply(self.step, batcher.batch_size)
        for batch, position in self._train_batches():
            global_size = position.batch_size
            stop_requested = self.stop_training  # asked for after the previous step
            for hook in step_begin:
                hook(self, self.step)
            if lr.dynamic:
                lr.apply(self.step, batcher.batch_size)
            measure = track_noise and self.step % NOISE_EVERY == 0
            if self._agreement is None:
                result = step_fn.accumulate(batch, global_size, measure_noise=measure)
                loss, noise = result.loss, result.noise
            else:
                loss, noise, stop = self._agreed_step(batch, global_size, measure, stop_requested)
                if stop:
                    # A rank asked to stop after the previous step, and the others learn it only now:
                    # every rank drops this step, so that all end where one process would have.
                    step_fn.skip()
                    self.stop_training = True
                    break
            recorded: torch.Tensor | float = loss
            if check_each_step:
                recorded = loss.item()  # read back now: the history keeps the float
                if not math.isfinite(recorded):
                    self._non_finite(recorded, epoch, position)
                    continue
            pair = None if noise is None else (noise.small_sq, step_fn.grad_sq(), noise.b_small, global_size)
            used_lr = optimizer.param_groups[0]["lr"]  # whoever set it: a schedule, scheduler or callback
            step_fn.update()
            if per_step_scheduler:
                lr.after_update()
            self.step += 1
            self.samples_seen += global_size
            self.position = position
            batches_done += 1
            now = time.perf_counter()
            seconds = self._elapsed_before + now - self._start  # type: ignore[operator]
            if track_noise:
                self._track_noise(pair)
                assert self.noise_tracker is not None
                history.add_step(self.step, epoch, self.samples_seen, global_size, recorded, used_lr, seconds,
                                 noise_scale=self.noise_tracker.b_simple)
            else:
                history.add_step(self.step, epoch, self.samples_seen, global_size, recorded, used_lr, seconds)
            if step_end:
                self._check_losses()
                record = history.record(-1)
                for hook in step_end:
                    hook(self, record)
            if val_every is not None and self.step % val_every == 0:
                assert val is not None
                self._validate_now(epoch, val)
            if log_hooks and now >= next_log:
                self._check_losses()
                for hook in log_hooks:
                    hook(self)
                next_log = now + LOG_EVERY
            if every is not None and self.step % every == 0:
                self.save_checkpoint()
            if progress.due(now):
                self._check_losses()
                rate = (self.samples_seen - start_samples) / max(now - start_time, 1e-9)
                progress.refresh(now, -(-done_before // batcher.batch_size) + batches_done, rate,
                                 history.losses()[-1], used_lr)
            if self._stop_after_step():
                break

    def _validate_now(self, epoch: int, val: Source) -> None:
        """Validation in the middle of an epoch (``val_every``), recorded in ``history.validations``."""
        metrics = self.evaluator.validate(val, self.dist)
        record = {"step": self.step, "epoch": epoch, "samples": self.samples_seen, "seconds": self._elapsed(),
                  **{f"val_{k}": v for k, v in metrics.items()}}
        self.history.validations.append(record)
        self.module.train()

    def _agreed_step(self, batch: Batch, global_size: int, measure: bool,
                     stop_requested: bool) -> tuple[torch.Tensor, NoiseSample | None, bool]:
        """A distributed step's forward and backward, with its agreement riding on the last backward.

        Returns the batch's mean loss, the ranks' averaged noise sample and whether some rank asked to stop.
        """
        agreement, step_fn = self._agreement, self.step_fn
        assert agreement is not None and step_fn is not None
        signalled = self.signals.received is not None

        def start(share: torch.Tensor, sample: NoiseSample | None) -> None:
            agreement.start(share, sample, stop_requested, signalled)

        step_fn.accumulate(batch, global_size, measure_noise=measure, before_last_backward=start)
        agreed = agreement.finish()
        self._note_signal(agreed.signal)
        return agreed.loss, agreed.noise, agreed.stop

    def _note_signal(self, any_rank: bool) -> None:
        if any_rank and self._agreed_signal is None:
            # Another rank's signal acts as SIGTERM here.
            self._agreed_signal = self.signals.received or signal.SIGTERM

    def _track_noise(self, pair: tuple[float, float, float, int] | None) -> None:
        """Fold the step's noise measurement into the estimate; apply what the adaptive policy proposes."""
        assert self.plan is not None and self.noise_tracker is not None and self.batcher is not None
        adaptive = self.plan.adaptive
        if adaptive is None:
            if pair is not None:
                self.noise_tracker.update(*pair)
            return
        change = adaptive.propose(self.step, pair)
        if change is not None:
            self.announce(f"step {self.step}: batch_size {adaptive.batch_size} -> {change.batch_size} "
                          f"({change.reason})")
            self.history.add_event(step=self.step, kind="batch_size", batch_size=change.batch_size,
                                   reason=change.reason, b_simple=change.b_simple)
            adaptive.accept(change)
            self.batcher.batch_size = change.batch_size

    def _stop_between_epochs(self) -> bool:
        """Whether to stop before the next epoch; in a distributed run, whether any rank asked to."""
        if self._agreement is None:
            if self.signals.received is not None:  # during the epoch's end (validation, callbacks, checkpoint)
                self._exit_on_signal()
            return self.stop_training
        self._agreement.start(None, None, self.stop_training, self.signals.received is not None)
        agreed = self._agreement.finish()
        self._note_signal(agreed.signal)
        self.stop_training = agreed.stop
        if self._agreed_signal is not None:
            self._exit_on_signal()
        return self.stop_training

    def _stop_after_step(self) -> bool:
        """Whether to end the epoch after this step (distributed: only on what every rank knows)."""
        if self.dist.enabled:
            return self._agreed_signal is not None  # stop requests are agreed at the next step
        return self.stop_training or self.signals.received is not None

    def _pending_signal(self) -> int | None:
        """The signal to stop for: this process's, or in a distributed run the one all ranks agreed on."""
        return self._agreed_signal if self.dist.enabled else self.signals.received

    def _all_ranks_raise(self, error: BaseException) -> bool:
        """Whether every rank raises ``error`` at the same point (nothing to abort): a NaN loss, or a signal."""
        if isinstance(error, NonFiniteLossError):
            return True
        return isinstance(error, (SystemExit, KeyboardInterrupt)) and self._agreed_signal is not None

    def _train_batches(self) -> Iterator[tuple[Batch, Position]]:
        """This epoch's batches on the device, each with the batcher's position just after it."""
        assert self.batcher is not None
        return device_prefetch(self.batcher.positioned(), self.device, param_dtype(self.module))

    def _end_epoch(self, epoch: int, val: Source | None, progress: Progress) -> dict[str, Any]:
        self._check_losses()
        record: dict[str, Any] = {"epoch": epoch, "loss": self.history.mean_loss(epoch), "steps": self.step,
                                  "samples": self.samples_seen, "seconds": self._elapsed()}
        if val is not None:
            record.update({f"val_{k}": v for k, v in self.evaluator.validate(val, self.dist).items()})
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        self.history.epochs.append(record)
        progress.end_epoch(record)
        return record

    # ------------------------------------------------------------------ guards
    def _check_losses(self) -> None:
        """Read back pending losses and raise on the first non-finite one (on_nan='raise')."""
        self._checked = check_losses(self.history, self._checked)

    def _non_finite(self, value: float, epoch: int, position: Position) -> None:
        """A step whose loss is NaN/inf: raise, or skip its batch (after rolling back, with on_nan='rollback')."""
        assert self.step_fn is not None
        step = self.step + 1
        self.step_fn.skip()
        if self.options.on_nan == "raise":
            raise non_finite_error(value, step, epoch)
        self.skipped_steps += 1
        self.position = position  # the batch is used up: a checkpoint continues after it
        if self.options.on_nan == "rollback":
            found = ckpt.load_latest(self.checkpoint_dir) if self.checkpoint_dir else None
            if not self.dist.all_equal(-1 if found is None else int(found[0]["step"])):
                raise DistributedError(f"rank {self.dist.rank}: the ranks found different checkpoints to roll back "
                                       f"to; every rank must see the same checkpoint_dir (a shared folder)")
            if found is not None:
                skipped = self.skipped_steps  # counts this skip, which the checkpoint does not know
                self.load_state_dict(found[0])
                self.position = position  # continue after the offending batch
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
        signum = self._pending_signal()
        assert signum is not None
        self.signals.received = None
        path = self.save_checkpoint()
        if self.dist.is_main:  # the rank that wrote the checkpoint
            logger.warning("received %s: saved %s and stopped", signal.Signals(signum).name, path)
        raise exit_for(signum)


def _signature() -> inspect.Signature:
    """``Trainer.__init__``'s signature with every option as a keyword, for ``help()`` and editors."""
    own = inspect.signature(Trainer.__init__)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(TrainerOptions)]
    return own.replace(parameters=params)


Trainer.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
