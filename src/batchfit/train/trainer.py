"""The Trainer: the mini-batch loop, from data to updated weights, epoch after epoch."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import distributed
from ..data.batcher import Batcher
from ..data.prefetch import device_prefetch
from ..data.sources import Batch, Source, as_source
from ..errors import (
    CheckpointError,
    DistributedError,
    NonFiniteLossError,
    check_positive_int,
    expected,
)
from . import checkpoint as ckpt
from .batch import LossFn, batch_len, forward, loss_of, target_of
from .callbacks import Callback, overriding
from .history import History
from .metrics import Metric, MetricSums, correct_count, is_classification
from .progress import Progress
from .settings import NOISE_EVERY, RESUME_KEYS, Settings, autocast, check_options, resolve_device
from .step import StepRunner

logger = logging.getLogger("batchfit")

class Trainer:
    """Trains ``model`` with ``optimizer`` on mini-batches; ``batch_size`` means samples per update.

    ``batch_size`` is an int, ``"full"`` (gradient descent over the whole dataset each step),
    ``"auto"`` (measured at the start) or ``"adaptive"`` (grows with the gradient noise scale).
    ``micro_batch_size`` splits each batch for memory (gradient accumulation); the update is
    the same for every split. See the README for every option.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn | None,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int | str = 64,
        micro_batch_size: int | str | None = None,
        shuffle: bool | str = True,
        drop_last: bool = False,
        lr_scaling: str | None = None,
        base_batch_size: int | None = None,
        warmup_steps: int = 0,
        lr_schedule: Callable[[int], float] | None = None,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        max_grad_norm: float | None = None,
        on_nan: str = "raise",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 3,
        callbacks: Sequence[Callback] = (),
        metrics: dict[str, Metric] | None = None,
        loss_count: Callable[[Batch], Any] | None = None,
        eval_batch_size: int | None = None,
        noise_scale: bool = False,
        max_batch_size: int | None = None,
        prefetch: int = 0,
        transform: Callable[[Batch], Batch] | None = None,
        workers: int = 0,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        check_options(model, loss_fn, optimizer, batch_size, micro_batch_size, shuffle, drop_last, lr_scaling,
                      base_batch_size, warmup_steps, precision, on_nan, max_grad_norm, checkpoint_dir,
                      checkpoint_every, keep_checkpoints, eval_batch_size, max_batch_size, callbacks, seed)

        self.device = resolve_device(device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.module = model.to(self.device)
        self.model: torch.nn.Module = self.module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.settings = Settings(batch_size, micro_batch_size, shuffle, drop_last, lr_scaling, base_batch_size,
                                  warmup_steps, precision, None if max_grad_norm is None else float(max_grad_norm),
                                  on_nan, checkpoint_every, keep_checkpoints, seed)
        self.lr_schedule = lr_schedule
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.callbacks = list(callbacks)
        self.metrics = dict(metrics or {})
        self.loss_count = loss_count
        self.eval_batch_size = eval_batch_size
        self.max_batch_size = max_batch_size
        # The continuous noise-scale estimate: asked for, or needed by adaptive batches / AdaScale.
        self.track_noise = bool(noise_scale) or batch_size == "adaptive" or lr_scaling == "adascale"
        self.noise_tracker: Any = None
        self.adaptive: Any = None  # set by batch_size="adaptive"
        self.prefetch = check_positive_int("prefetch", prefetch, allow_zero=True)
        self.transform = transform
        self.workers = check_positive_int("workers", workers, allow_zero=True)
        self.progress = bool(progress) and self.dist.is_main
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.param_dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), None)

        self.history = History()
        self.step = 0  # completed weight updates
        self.samples_seen = 0
        self.skipped_steps = 0
        self.stop_training = False
        self.batcher: Batcher | None = None
        self.runner: StepRunner | None = None
        self._elapsed_before = 0.0
        self._lr_factor = math.nan
        self._lr_now = math.nan
        self._checked = 0  # steps whose losses have been checked for NaN
        self._signal: int | None = None
        self._agreed_signal: int | None = None  # a signal some rank received, known to all (distributed)
        self._stop_requested = False  # distributed: stop_training as it was when the step began
        self._agreement: tuple[torch.Tensor, Any] | None = None  # the step's all-reduce under way

    # ------------------------------------------------------------------ public API
    def fit(self, train: Any, epochs: int = 1, val: Any = None, resume: bool = False) -> History:
        """Train ``epochs`` more epochs and return the history (also of earlier calls).

        ``train``/``val`` are sources, tuples of arrays or map-style datasets. A second call
        continues with the next epochs (and their sample orders). With ``resume=True``,
        ``epochs`` counts from the start of the run instead, and training continues from the
        newest readable checkpoint in ``checkpoint_dir`` (or starts fresh when there is none):
        running the same command again after a crash finishes the same run, with the weights
        of a run that was never interrupted.
        """
        check_positive_int("epochs", epochs, allow_zero=True)
        if resume and self.checkpoint_dir is None:
            raise expected("checkpoint_dir", "a folder when resume=True", None)
        src = as_source(train, "train")
        val_src = None if val is None else as_source(val, "val")
        first_epoch = self.batcher.epoch if self.batcher is not None and not resume else 0
        try:
            found = self._find_checkpoint() if resume else None
            self._prepare(src, None if found is None else found[0])
            if found is not None:
                self._resume(*found)
            else:
                self.batcher.set_epoch(first_epoch)
            if resume and not self.dist.all_equal(self.step):
                raise DistributedError(f"rank {self.dist.rank}: the ranks resumed from checkpoints of different "
                                       f"steps (this one: step {self.step}); every rank must see the same "
                                       f"checkpoint_dir (a shared folder)")
            with self._signal_handlers():
                self._run(epochs if resume else first_epoch + epochs, val_src)
        except BaseException as error:
            if not self.dist.enabled or self._all_ranks_raise(error):
                raise
            # Leave the process group now, so that the other ranks stop at once instead of waiting
            # for this one until the timeout; an error caused by another rank becomes a DistributedError.
            replacement = self.dist.abort(error)
            if replacement is None:
                raise
            raise replacement from error
        return self.history

    def evaluate(self, data: Any, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss over ``data`` (and accuracy for class-index targets, and user metrics).

        This process evaluates all of ``data`` by itself (no collectives), so in a distributed run
        any rank may call it, alone or with the others.
        """
        return self._metric_sums(as_source(data, "data"), batch_size).result()

    def _metric_sums(self, src: Source, batch_size: int | None, shard: bool = False) -> MetricSums:
        sums = MetricSums()
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                for batch in self._eval_batches(src, batch_size, shard):
                    n = batch_len(batch)
                    if n == 0:  # this rank's share of a last batch smaller than the world
                        continue
                    with self._autocast():
                        output = forward(self.module, batch)
                        loss = loss_of(output, batch, self.loss_fn)
                    # The mean over tokens when the loss counts tokens, as in training.
                    sums.add("loss", loss, n if self.loss_count is None else self.loss_count(batch))
                    target = target_of(batch)
                    if is_classification(output, target):
                        assert target is not None
                        sums.add_correct(correct_count(output, target), n)
                    for name, metric in self.metrics.items():
                        sums.add(name, metric(output, target), n)
                    sums.count += n
        finally:
            self.module.train(was_training)
        return sums

    def _validate(self, val: Source) -> dict[str, float]:
        """Validation metrics, the same on every rank.

        In a distributed run each rank evaluates its share of ``val`` and one all-reduce sums the
        shares: world-size times less work than each rank evaluating everything, and the sums
        that every rank divides are the same numbers.
        """
        if not self.dist.enabled or len(val) < self.dist.world_size:
            return self.evaluate(val)
        sums = self._metric_sums(val, None, shard=True)
        sums.all_reduce(self.dist.all_reduce_sum)
        return sums.result()

    def predict(self, data: Any, batch_size: int | None = None) -> torch.Tensor:
        """Model outputs for every sample of ``data`` in order, concatenated on the CPU."""
        src = as_source(data, "data")
        outputs = []
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                for batch in self._eval_batches(src, batch_size):
                    with self._autocast():
                        output = forward(self.module, batch)
                    outputs.append(getattr(output, "logits", output).float().cpu())
        finally:
            self.module.train(was_training)
        return torch.cat(outputs)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimizer, position, RNGs, history, config."""
        assert self.batcher is not None and self.runner is not None
        state = {
            "format": 1,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.runner.scaler.state_dict() if self.runner.scaler is not None else None,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "batcher": self.batcher.state_dict(),
            "rng": ckpt.rng_state(),
            "history": self.history.state_dict(),
            "elapsed": self._elapsed(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": self._config(),
            "world_size": self.dist.world_size,
            "noise_tracker": None if self.noise_tracker is None else self.noise_tracker.state_dict(),
            "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the trainer must be prepared for the same data)."""
        assert self.batcher is not None and self.runner is not None
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.runner.scaler is not None and state["scaler"] is not None:
            self.runner.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.skipped_steps = state["skipped_steps"]
        self.batcher.load_state_dict(state["batcher"])
        self.history.load_state_dict(state["history"])
        self._checked = len(self.history)
        self._elapsed_before = state["elapsed"]
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        if self.noise_tracker is not None and state.get("noise_tracker") is not None:
            self.noise_tracker.load_state_dict(state["noise_tracker"])
        if self.adaptive is not None and state.get("adaptive") is not None:
            self.adaptive.load_state_dict(state["adaptive"])
        ckpt.set_rng_state(state["rng"])
        self._lr_factor = math.nan  # re-applied before the next step

    def save_checkpoint(self) -> str | None:
        """Write a checkpoint now (rank 0 only); returns its path."""
        if self.checkpoint_dir is None:
            raise expected("checkpoint_dir", "a folder to save checkpoints in", None)
        self._check_losses()
        if not self.dist.is_main:
            return None
        path = ckpt.save_checkpoint(self.state_dict(), self.checkpoint_dir, self.step, self.settings.keep_checkpoints)
        return os.fspath(path)

    # ------------------------------------------------------------------ setup
    def _prepare(self, src: Source, saved: dict[str, Any] | None = None) -> None:
        self.adaptive = None
        batch_size = self._resolve_batch_size(src, saved)
        if self.dist.enabled and saved is None and self.settings.batch_size in ("auto", "adaptive"):
            # Each rank measured its own throughput; all must train with the same batch size: rank 0's.
            choice = torch.tensor([batch_size if self.dist.is_main else 0], dtype=torch.int64, device=self.device)
            batch_size = int(self.dist.all_reduce_sum(choice))
            if self.adaptive is not None:
                self.adaptive.batch_size = batch_size
        micro = self.settings.micro_batch_size
        if micro == "auto":
            micro = self._auto_micro_batch_size(src, batch_size)
        elif isinstance(micro, int) and micro >= batch_size:
            micro = None
        self.batcher = Batcher(src, batch_size, self.settings.shuffle, self.settings.drop_last, self.settings.seed,
                               self.dist.rank, self.dist.world_size, pin_memory=self.device.type == "cuda",
                               prefetch=self.prefetch, transform=self.transform, workers=self.workers)
        self.runner = StepRunner(self.model, self.loss_fn, self.optimizer, micro, self.device,
                                 self.settings.precision, self.settings.max_grad_norm, self.dist.world_size,
                                 self.loss_count, self.dist.all_reduce_sum)
        self.resolved_micro_batch_size = micro
        if self.dist.enabled:
            self.runner.before_sync = self._start_agreement
        if self.adaptive is not None:
            self.noise_tracker = self.adaptive.tracker
        elif self.track_noise:
            from ..tune.noise import NoiseScaleTracker

            self.noise_tracker = NoiseScaleTracker(beta=0.95)

    def _resolve_batch_size(self, src: Source, saved: dict[str, Any] | None) -> int:
        batch_size = self.settings.batch_size
        if batch_size == "full":
            return len(src)
        if batch_size in ("auto", "adaptive"):
            from ..tune.auto import AdaptiveBatch, choose_batch_size

            if saved is None:
                return choose_batch_size(self, src)
            # Resuming: the measured choice is part of the run, not measured again.
            if batch_size == "adaptive":
                self.adaptive = AdaptiveBatch(start=saved["batcher"]["batch_size"], max_batch=len(src))
            return int(saved["batcher"]["batch_size"])
        assert isinstance(batch_size, int)
        if self.settings.drop_last and batch_size > len(src):
            raise expected("batch_size", f"at most the number of samples ({len(src)}) when drop_last=True",
                           batch_size)
        return batch_size

    def _auto_micro_batch_size(self, src: Source, batch_size: int) -> int | None:
        from ..tune.memory import find_micro_batch_size

        fits = find_micro_batch_size(self.module, self.loss_fn, src, device=self.device, optimizer=self.optimizer,
                                     max_size=batch_size)
        logger.info("micro_batch_size='auto': %d fits in memory (batch_size stays %d)", fits, batch_size)
        return None if fits >= batch_size else fits

    def _find_checkpoint(self) -> tuple[dict[str, Any], Any] | None:
        assert self.checkpoint_dir is not None
        found = ckpt.load_latest(self.checkpoint_dir)
        if found is None:
            logger.info("no checkpoint in %s: starting fresh", self.checkpoint_dir)
        return found

    def _resume(self, state: dict[str, Any], path: Any) -> None:
        ckpt.check_compatible(state["config"], self._config(), RESUME_KEYS, path)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {error}") from error
        logger.info("resumed from %s at step %d, epoch %d", path, self.step, self.batcher.epoch if self.batcher else 0)

    def _config(self) -> dict[str, Any]:
        assert self.batcher is not None
        config = dict(vars(self.settings))
        config.update(batch_size=self.batcher.batch_size, num_samples=self.batcher.num_samples,
                      micro_batch_size=self.resolved_micro_batch_size, device=str(self.device),
                      world_size=self.dist.world_size)
        if self.settings.batch_size in ("auto", "adaptive"):
            config["batch_size"] = self.settings.batch_size
        return config

    # ------------------------------------------------------------------ the loop
    def _run(self, epochs: int, val: Source | None) -> None:
        batcher, progress = self.batcher, Progress(self.progress)
        assert batcher is not None
        hooks = {name: overriding(self.callbacks, name) for name in
                 ("on_fit_begin", "on_fit_end", "on_epoch_begin", "on_epoch_end", "on_step_begin", "on_step_end")}
        self.stop_training = False  # before on_fit_begin, so that a callback can stop at once
        self._agreed_signal = None
        for hook in hooks["on_fit_begin"]:
            hook(self)
        self.module.train()
        self._start = time.perf_counter()
        while batcher.epoch < epochs and not self._stop_between_epochs():
            epoch = batcher.epoch
            for hook in hooks["on_epoch_begin"]:
                hook(self, epoch)
            self._run_epoch(epoch, epochs, progress, hooks)
            if self._pending_signal() is not None:
                self._exit_on_signal()
            if not batcher.epoch_done:
                break  # stopped early inside the epoch
            record = self._end_epoch(epoch, val, progress)
            batcher.set_epoch(epoch + 1)
            for hook in hooks["on_epoch_end"]:
                hook(self, epoch, record)
            if self.checkpoint_dir is not None:
                self.save_checkpoint()
        self._check_losses()
        for hook in hooks["on_fit_end"]:
            hook(self, self.history)

    def _run_epoch(self, epoch: int, epochs: int, progress: Progress, hooks: dict[str, list[Any]]) -> None:
        batcher, runner, history = self.batcher, self.runner, self.history
        assert batcher is not None and runner is not None
        every = self.settings.checkpoint_every
        # Reading the loss back costs a device sync on CUDA, so on_nan="raise" checks lazily there
        # (at the next readback); on the CPU it costs nothing and the bad update is never applied.
        check_each_step = self.settings.on_nan != "raise" or self.dist.enabled or self.device.type == "cpu"
        step_begin, step_end = hooks["on_step_begin"], hooks["on_step_end"]
        start_samples, start_time = self.samples_seen, time.perf_counter()
        done_before = batcher.samples_done
        progress.start_epoch(epoch, epochs, len(batcher), -(-done_before // batcher.batch_size), start_time)
        batches_done = 0
        dynamic_lr = bool(self.settings.warmup_steps or self.lr_schedule is not None
                          or self.settings.batch_size == "adaptive" or self.settings.lr_scaling == "adascale")
        self._apply_lr()
        for batch in self._train_batches():
            global_size = batcher.last_batch_size
            self._stop_requested = self.stop_training  # asked for after the previous step
            for hook in step_begin:
                hook(self, self.step)
            if dynamic_lr:
                self._apply_lr()
            runner.measure_noise = self.track_noise and self.step % NOISE_EVERY == 0
            loss = runner.accumulate(batch, global_size)
            if self.dist.enabled:
                loss, stop = self._finish_agreement(global_size)  # started by the runner before the last backward
                if stop:
                    # A rank asked to stop after the previous step, and the others learn it only now:
                    # every rank drops this step, so that all end where one process would have.
                    runner.skip()
                    runner.noise_pair = None
                    batcher.samples_done -= global_size
                    self.stop_training = True
                    break
            if check_each_step:
                value = loss.item()
                if not math.isfinite(value):
                    self._non_finite(value, epoch)
                    continue
                loss = value  # already read back: the history keeps the float
            runner.update()
            self.step += 1
            self.samples_seen += global_size
            batches_done += 1
            now = time.perf_counter()
            if self.noise_tracker is None:
                history.add_step(self.step, epoch, self.samples_seen, global_size, loss, self._lr_now,
                                 self._elapsed_before + now - self._start)
            else:
                self._track_noise(epoch, global_size, loss, now)
            if step_end:
                self._check_losses()
                record = history.record(-1)
                for hook in step_end:
                    hook(self, record)
            if every is not None and self.step % every == 0:
                self.save_checkpoint()
            if progress.due(now):
                self._check_losses()
                rate = (self.samples_seen - start_samples) / max(now - start_time, 1e-9)
                progress.refresh(now, -(-done_before // batcher.batch_size) + batches_done, rate,
                                 history.losses()[-1], self._lr_now)
            if self._stop_after_step():
                break

    def _start_agreement(self, loss: torch.Tensor | None, noise: tuple[float, int] | None = None) -> None:
        """Start a step's one all-reduce: the loss summed over ranks, with what all must decide alike.

        Besides the loss it carries whether any rank asked to stop or received a signal, and each
        rank's (small², b_small) noise measurement, whose first micro-batch gradient is local to the
        rank: the measurements are averaged, so every rank's tracker (and so its batch size and
        learning rate) stays the same. The runner starts it just before the step's last backward,
        so that it travels while the backward computes instead of adding a wait of its own.
        """
        small_sq, b_small = noise if noise is not None else (0.0, math.inf)
        values = torch.tensor([0.0, float(self._stop_requested), float(self._signal is not None), small_sq,
                               1.0 / b_small, float(noise is not None)], dtype=torch.float64, device=self.device)
        if loss is not None:
            values[0] = loss.detach()
        self._agreement = (values, self.dist.start_all_reduce_sum(values))

    def _finish_agreement(self, global_size: int = 0) -> tuple[torch.Tensor, bool]:
        """The summed loss and whether any rank asked to stop; notes an agreed signal and noise measurement."""
        assert self.runner is not None and self._agreement is not None
        values, work = self._agreement
        self._agreement = None
        self.dist.wait(work)
        _, stops, signals, small_sum, inverse_b_sum, measured = values.tolist()
        if signals and self._agreed_signal is None:
            self._agreed_signal = self._signal or signal.SIGTERM  # another rank's signal acts as SIGTERM here
        if measured:
            from ..tune.noise import squared_grad_norm

            # The whole batch's gradient is the same on every rank (all-reduced); E|G_b|² = |G|² + tr(Σ)/b,
            # so the mean over ranks of measurements at sizes b_r is one at their harmonic mean.
            pair = self.runner.noise_pair
            big_sq = pair[1] if pair is not None else squared_grad_norm(p.grad for p in self.runner.params)
            self.runner.noise_pair = (small_sum / measured, big_sq, measured / inverse_b_sum, global_size)
        return values[0].float(), stops > 0

    def _stop_between_epochs(self) -> bool:
        """Whether to stop before the next epoch; in a distributed run, whether any rank asked to."""
        if not self.dist.enabled:
            return self.stop_training
        self._stop_requested = self.stop_training
        self._start_agreement(None)
        self.stop_training = self._finish_agreement()[1]
        if self._agreed_signal is not None:
            self._exit_on_signal()
        return self.stop_training

    def _stop_after_step(self) -> bool:
        """Whether to end the epoch after this step (distributed: only on what every rank knows)."""
        if self.dist.enabled:
            return self._agreed_signal is not None  # stop requests are agreed at the next step
        return self.stop_training or self._signal is not None

    def _pending_signal(self) -> int | None:
        """The signal to stop for: this process's, or in a distributed run the one all ranks agreed on."""
        return self._agreed_signal if self.dist.enabled else self._signal

    def _all_ranks_raise(self, error: BaseException) -> bool:
        """Whether every rank raises ``error`` at the same point (nothing to abort): a NaN loss, or a signal."""
        if isinstance(error, NonFiniteLossError):
            return True
        return isinstance(error, (SystemExit, KeyboardInterrupt)) and self._agreed_signal is not None

    def _track_noise(self, epoch: int, global_size: int, loss: Any, now: float) -> None:
        """Fold the step's gradient norms into the noise scale; let adaptive batches react."""
        assert self.runner is not None
        pair, self.runner.noise_pair = self.runner.noise_pair, None
        if self.adaptive is not None:
            self.adaptive.update(self, pair)
        elif pair is not None:
            self.noise_tracker.update(*pair)
        self.history.add_step(self.step, epoch, self.samples_seen, global_size, loss, self._lr_now,
                              self._elapsed_before + now - self._start, noise_scale=self.noise_tracker.b_simple)

    def _train_batches(self) -> Iterator[Batch]:
        assert self.batcher is not None
        if self.device.type != "cuda":
            return device_prefetch(self.batcher.remaining(), self.device, self.param_dtype)
        return _at_own_position(self.batcher, self.device, self.param_dtype)

    def _end_epoch(self, epoch: int, val: Source | None, progress: Progress) -> dict[str, Any]:
        self._check_losses()
        record: dict[str, Any] = {"epoch": epoch, "loss": self.history.mean_loss(epoch), "steps": self.step,
                                  "samples": self.samples_seen, "seconds": self._elapsed()}
        if val is not None:
            record.update({f"val_{k}": v for k, v in self._validate(val).items()})
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        self.history.epochs.append(record)
        shown = "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k in ("loss",) or k.startswith("val_"))
        progress.end_epoch(shown)
        return record

    # ------------------------------------------------------------------ helpers
    def _apply_lr(self) -> None:
        factor = 1.0 if self._constant_lr() else self._lr_multiplier(self.step)
        if factor != self._lr_factor:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            self._lr_factor = factor
            self._lr_now = self.optimizer.param_groups[0]["lr"]

    def _constant_lr(self) -> bool:
        s = self.settings
        return s.lr_scaling is None and not s.warmup_steps and self.lr_schedule is None

    def _lr_multiplier(self, step: int) -> float:
        """Batch-size scaling × warm-up × user schedule for the update after ``step`` steps."""
        from ..tune.lr import scale_lr, warmup

        s = self.settings
        factor = 1.0
        if s.lr_scaling == "adascale":
            factor = self._adascale_gain()
        elif s.lr_scaling is not None:
            assert self.batcher is not None and s.base_batch_size is not None
            # Adaptive batches scale the lr to the starting batch only: growing the batch afterwards
            # takes the place of decaying the lr (Smith et al. 2018).
            size = self.adaptive.start if self.adaptive is not None else self.batcher.batch_size
            factor = scale_lr(1.0, s.base_batch_size, size, s.lr_scaling)
        if s.warmup_steps:
            factor *= warmup(step, s.warmup_steps)
        if self.lr_schedule is not None:
            factor *= float(self.lr_schedule(step))
        return factor

    def _adascale_gain(self) -> float:
        """AdaScale's gain for the current batch over ``base_batch_size`` (1 until measured)."""
        from ..tune.lr import adascale_gain

        assert self.batcher is not None and self.settings.base_batch_size is not None
        scale = self.batcher.batch_size / self.settings.base_batch_size
        tracker = self.noise_tracker
        if scale <= 1 or tracker is None or tracker.count == 0 or not math.isfinite(tracker.grad_sq):
            return 1.0 if scale >= 1 else scale
        return adascale_gain(tracker.grad_sq, tracker.trace_cov, scale, self.settings.base_batch_size)

    def _check_losses(self) -> None:
        """Read back pending losses and raise on the first non-finite one (on_nan='raise')."""
        losses = self.history.losses()
        if self._checked >= len(losses):
            return
        for index in range(self._checked, len(losses)):
            if not math.isfinite(losses[index]):
                record = self.history.steps[index]
                raise NonFiniteLossError(
                    f"the loss of step {record['step']} (epoch {record['epoch']}) is {losses[index]}; "
                    f"lower the learning rate, set max_grad_norm, or use on_nan='skip'",
                    step=record["step"], epoch=record["epoch"])
        self._checked = len(losses)

    def _non_finite(self, value: float, epoch: int) -> None:
        assert self.runner is not None and self.batcher is not None
        step = self.step + 1
        self.runner.skip()
        if self.settings.on_nan == "raise":
            raise NonFiniteLossError(f"the loss of step {step} (epoch {epoch}) is {value}; lower the learning "
                                     f"rate, set max_grad_norm, or use on_nan='skip'", step=step, epoch=epoch)
        self.skipped_steps += 1
        if self.settings.on_nan == "rollback":
            position = self.batcher.state_dict()
            found = ckpt.load_latest(self.checkpoint_dir) if self.checkpoint_dir else None
            if not self.dist.all_equal(-1 if found is None else int(found[0]["step"])):
                raise DistributedError(f"rank {self.dist.rank}: the ranks found different checkpoints to roll back "
                                       f"to; every rank must see the same checkpoint_dir (a shared folder)")
            if found is not None:
                skipped = self.skipped_steps  # counts this skip, which the checkpoint does not know
                self.load_state_dict(found[0])
                self.batcher.load_state_dict(position)  # continue after the offending batch
                self.skipped_steps = skipped
                logger.warning("non-finite loss at step %d (epoch %d): rolled back to %s and skipped the batch",
                               step, epoch, found[1])
                return
        logger.warning("non-finite loss at step %d (epoch %d): skipped the update (%d skipped so far)",
                       step, epoch, self.skipped_steps)

    def _eval_batches(self, src: Source, batch_size: int | None, shard: bool = False) -> Iterator[Batch]:
        """Batches of ``src`` in order; with ``shard``, this rank's share of each (batches of size x world)."""
        size = batch_size or self.eval_batch_size or max(256, self.resolved_eval_size())
        rank, world_size = (self.dist.rank, self.dist.world_size) if shard else (0, 1)
        batcher = Batcher(src, min(size * world_size, len(src)), shuffle=False, seed=0, rank=rank,
                          world_size=world_size, pin_memory=self.device.type == "cuda")
        return device_prefetch(batcher.remaining(), self.device, self.param_dtype)

    def resolved_eval_size(self) -> int:
        """The micro-batch size used for training, as a default evaluation batch size."""
        micro = getattr(self, "resolved_micro_batch_size", None)
        if isinstance(micro, int):
            return micro
        return self.batcher.batch_size if self.batcher is not None else 256

    def _autocast(self) -> Any:
        return autocast(self.settings.precision, self.device.type)

    def _elapsed(self) -> float:
        start = getattr(self, "_start", None)
        return self._elapsed_before + (time.perf_counter() - start if start is not None else 0.0)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """On SIGTERM/SIGINT with a checkpoint folder: finish the step, save, then exit."""
        if self.checkpoint_dir is None or threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, frame: Any) -> None:
            self._signal = signum

        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _exit_on_signal(self) -> None:
        signum = self._pending_signal()
        self._signal = None
        path = self.save_checkpoint()
        if self.dist.is_main:  # the rank that wrote the checkpoint
            logger.warning("received %s: saved %s and stopped", signal.Signals(signum).name, path)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(signum or 0))


def _at_own_position(batcher: Batcher, device: torch.device, dtype: torch.dtype | None) -> Iterator[Batch]:
    """Batches copied ahead to ``device``, each handed out with the batcher's position just after it.

    The copy of batch k+1 starts while batch k computes, which moves the batcher one batch on;
    restoring its position per batch keeps ``last_batch_size`` (the weight of the batch's loss)
    and the position a checkpoint saves those of the batch being trained on.
    """
    positions: deque[tuple[int, int]] = deque()

    def taken() -> Iterator[Batch]:
        for batch in batcher.remaining():
            positions.append((batcher.samples_done, batcher.last_batch_size))
            yield batch

    for batch in device_prefetch(taken(), device, dtype):
        batcher.samples_done, batcher.last_batch_size = positions.popleft()
        yield batch
