"""The epochs of a data set, as the one loop trains on them (a :class:`~.session.Feed`).

A data set's batches come from the trainer's :class:`~batchfit.data.batcher.Batcher`, each with its
position (where the batcher stands just after it), so that a checkpoint continues after the last
batch trained on. What only a data set has: epochs of a known length, the gradient noise scale and
the adaptive batch size it drives, and, in a distributed run, the ranks' agreement riding on the
last backward of each step (:class:`~batchfit.distributed.StepAgreement`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.batch import Batch, param_dtype
from ..core.step import NoiseSample, StepResult
from ..data.batcher import Batcher, Position
from ..data.prefetch import device_prefetch
from ..errors import CheckpointError
from .options import NOISE_EVERY, RESUME_KEYS
from .progress import Progress

if TYPE_CHECKING:
    from .trainer import Trainer

_NO_COLUMNS: dict[str, Any] = {}  # (never changed)


class EpochFeed:
    """``epochs`` epochs (counted from the start of the run) of ``batcher``'s batches, from ``first_epoch`` on
    when the run starts fresh."""

    open_ended = False
    resume_keys = RESUME_KEYS

    def __init__(self, trainer: Trainer, batcher: Batcher, first_epoch: int, epochs: int) -> None:
        self.trainer, self.batcher, self.first_epoch, self.epochs = trainer, batcher, first_epoch, epochs
        assert trainer.step_fn is not None
        self.step_fn = trainer.step_fn
        self.position: Position | None = None  # just after the last batch trained (or skipped)
        # Reading the loss back costs a device sync on CUDA, so on_nan="raise" checks lazily there
        # (at the next readback); on the CPU it costs nothing and the bad update is never applied.
        self.check_each_step = (trainer.options.on_nan != "raise" or trainer.dist.enabled
                                or trainer.device.type == "cpu")

    @property
    def epoch(self) -> int:
        """The epoch being trained, counted from 1 (the batcher's order index counts from 0)."""
        return self.batcher.epoch + 1

    def start_fresh(self) -> None:
        """Start at ``first_epoch``; a measured batch plan is saved as a step-0 checkpoint before the first step."""
        self.batcher.set_epoch(self.first_epoch)
        if self.trainer.checkpoint_dir is not None and self.measured_plan():
            self.trainer.save_checkpoint()  # the measured plan is part of the run from now on

    def more(self) -> bool:
        return self.batcher.epoch < self.epochs and not self.trainer.stop_between_epochs()

    def nothing_left(self) -> str | None:
        """Why a resumed run has nothing to train (``None``: it has)."""
        if self.batcher.epoch < self.epochs:
            return None
        return (f"The run in {self.trainer.checkpoint_dir} had already finished {self.batcher.epoch} of {self.epochs} "
                f"epochs: nothing to train (raise `epochs`, or use another checkpoint_dir for a new run)")

    def start_epoch(self, progress: Progress, now: float) -> int:
        batcher = self.batcher
        self.position = Position(batcher.epoch, batcher.samples_done, 0)
        already = -(-batcher.samples_done // batcher.batch_size)
        progress.start_epoch(self.epoch, self.epochs, len(batcher), already, now)
        self.trainer.lr.apply(self.trainer.step, batcher.batch_size)
        return already

    def batches(self) -> Iterator[tuple[Batch, Position]]:
        """This epoch's batches on the device, each with the batcher's position just after it."""
        trainer = self.trainer
        return device_prefetch(self.batcher.positioned(), trainer.device, param_dtype(trainer.module))

    def lr_batch_size(self, size: int) -> int:
        return self.batcher.batch_size  # a short last batch keeps the lr of the others

    def step(self, batch: Batch, size: int, stop_requested: bool) -> StepResult:
        trainer = self.trainer
        measure = trainer.noise_tracker is not None and trainer.step % NOISE_EVERY == 0
        agreement = trainer._agreement
        if agreement is None:
            return self.step_fn.step(batch, size, check_finite=self.check_each_step, measure_noise=measure)
        signalled = trainer.signals.received is not None
        ride = self.step_fn.scaler is None  # a loss scale would multiply the numbers riding as a gradient

        def start(share: torch.Tensor, sample: NoiseSample | None) -> torch.Tensor | None:
            return agreement.start(share, sample, stop_requested, signalled, ride=ride)  # rides on the last backward

        def finish(result: StepResult) -> StepResult:
            agreed = agreement.finish()
            trainer.note_signal(agreed.signal)
            result.loss, result.noise, result.stop = agreed.loss, agreed.noise, agreed.stop
            if agreed.stop:
                trainer.stop_training = True
            return result

        return self.step_fn.step(batch, size, measure_noise=measure, before_last_backward=start, after_sync=finish)

    def skipped(self, mark: Position) -> None:
        self.position = mark

    def columns(self, batch: Batch, mark: Position, result: StepResult) -> dict[str, Any]:
        self.position = mark
        tracker = self.trainer.noise_tracker
        if tracker is None:
            return _NO_COLUMNS
        noise = result.noise
        self._track_noise(None if noise is None or result.grad_sq is None
                          else (noise.small_sq, result.grad_sq, noise.b_small, mark.batch_size))
        return {"noise_scale": tracker.b_simple}

    def _track_noise(self, pair: tuple[float, float, float, int] | None) -> None:
        """Fold the step's noise measurement into the estimate; apply what the adaptive policy proposes."""
        trainer = self.trainer
        assert trainer.plan is not None and trainer.noise_tracker is not None
        adaptive = trainer.plan.adaptive
        if adaptive is None:
            if pair is not None:
                trainer.noise_tracker.update(*pair)
            return
        change = adaptive.propose(trainer.step, pair)
        if change is not None:
            trainer.announce(f"step {trainer.step}: batch_size {adaptive.batch_size} -> {change.batch_size} "
                             f"({change.reason})")
            trainer.history.add_event(step=trainer.step, kind="batch_size", batch_size=change.batch_size,
                                      reason=change.reason, b_simple=change.b_simple)
            adaptive.accept(change)
            self.batcher.batch_size = change.batch_size

    def end_steps(self) -> None:
        assert self.position is not None
        self.batcher.seek(self.position)  # batches fetched ahead but not trained on are not counted

    def epoch_done(self) -> bool:
        return self.batcher.epoch_done

    def epoch_record(self, epoch: int) -> dict[str, Any]:
        return {"loss": self.trainer.history.mean_loss(epoch)}

    def next_epoch(self) -> None:
        self.batcher.set_epoch(self.epoch)  # the order index of the next epoch is this one's number
        self.position = None

    def release(self) -> None:
        pass

    def shown_loss(self) -> float:
        return self.trainer.history.losses()[-1]

    def shown_note(self) -> str:
        return ""

    def fell_back(self, state: dict[str, Any], path: Path, skipped: list[Path]) -> None:
        pass  # the batches after the checkpoint come again, in the same order

    def before_checkpoint(self) -> None:
        pass

    def after_checkpoint(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        assert trainer.plan is not None
        tracker, adaptive = trainer.noise_tracker, trainer.plan.adaptive
        return {
            "batcher": self.batcher.state_dict(self.position),
            "config": self.config(),
            "noise_tracker": None if tracker is None else tracker.state_dict(),
            "adaptive": None if adaptive is None else adaptive.state_dict(),
            "lr_cap": trainer.lr.rule_cap,
        }

    def check(self, state: dict[str, Any], path: Path) -> None:
        if state.get("kind") == "stream":
            raise CheckpointError(f"checkpoint {path} was written by training on a stream, not on a data set; "
                                  f"use another checkpoint_dir")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = self.trainer
        assert trainer.plan is not None
        self.batcher.load_state_dict(state["batcher"])
        self.position = None
        if trainer.noise_tracker is not None and state.get("noise_tracker") is not None:
            trainer.noise_tracker.load_state_dict(state["noise_tracker"])
        if trainer.plan.adaptive is not None and state.get("adaptive") is not None:
            trainer.plan.adaptive.load_state_dict(state["adaptive"])
            trainer.lr.start_batch = trainer.plan.adaptive.start
        trainer.lr.rule_cap = float(state.get("lr_cap", math.inf))

    def resumed_at(self) -> str:
        return f"in epoch {self.batcher.epoch + 1}"

    def config(self) -> dict[str, Any]:
        trainer = self.trainer
        config = dataclasses.asdict(trainer.options)
        config.update(batch_size=self.batcher.batch_size, num_samples=self.batcher.num_samples,
                      micro_batch_size=trainer.resolved_micro_batch_size, device=str(trainer.device),
                      world_size=trainer.dist.world_size, optimizer=type(trainer.optimizer).__name__,
                      lrs=[float(lr) for lr in trainer.lr.base_lrs], data_fingerprint=trainer._fingerprint)
        if trainer.options.measured_batch:
            config["batch_size"] = trainer.options.batch_size
        return config

    def measured_plan(self) -> bool:
        """Whether this fit measured its batch plan (a choice a restart must not measure again)."""
        plan = self.trainer.plan
        return plan is not None and (plan.choice is not None or self.trainer.options.micro_batch_size == "auto")
