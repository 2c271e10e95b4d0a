"""The learning rate of each update: one function of the step and the batch size.

lr = base lr × batch-size rule × warm-up × user schedule, where the rule is ``lr_scaling``
(linear or square-root scaling from ``base_batch_size``, or AdaScale's gain from the measured
gradient noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError, expected
from ..measure.lr import adascale_gain, scale_lr, warmup
from ..measure.noise import NoiseScaleTracker
from .options import TrainerOptions


class LRControl:
    """Sets the optimizer's learning rates before each update.

    ``base_lrs`` are the lrs of the optimizer's groups when the trainer was made (groups keep
    their ratios). For adaptive batches a linear/sqrt rule scales to the starting batch only
    (``scale_from_start``): growing the batch afterwards takes the place of decaying the lr
    (Smith et al. 2018).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, options: TrainerOptions, schedule: Any) -> None:
        self.optimizer, self.options = optimizer, options
        self.scheduler = _torch_scheduler(schedule, optimizer, options)
        self.schedule: Callable[[int], float] | None = None if self.scheduler is not None else schedule
        self._scaled_for_scheduler = False
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.tracker: NoiseScaleTracker | None = None
        self.start_batch: int | None = None  # adaptive runs: the batch the rule scales to
        self.rule_cap = math.inf  # "auto": the most the rule may raise the lr, where its own factor did not train
        # With a torch scheduler the scheduler sets the lrs; batchfit only scales them once (begin()).
        self.constant = self.scheduler is not None or (options.lr_scaling is None and not options.warmup_steps
                                                       and schedule is None)
        # Whether the lr can change from one step to the next (not only from one fit to the next).
        self.dynamic = self.scheduler is None and bool(options.warmup_steps or schedule is not None
                                                       or options.batch_size == "adaptive"
                                                       or options.lr_scaling == "adascale")
        self._factor = float("nan")

    def factor(self, step: int, batch_size: int) -> float:
        """Batch-size rule × warm-up × user schedule for the update after ``step`` steps at ``batch_size``."""
        o = self.options
        factor = 1.0
        if o.lr_scaling == "adascale":
            factor = self._adascale_gain(batch_size)
        elif o.lr_scaling is not None:
            assert o.base_batch_size is not None
            factor = min(scale_lr(1.0, o.base_batch_size, self.start_batch or batch_size, o.lr_scaling),
                         self.rule_cap)
        if o.warmup_steps:
            factor *= warmup(step, o.warmup_steps)
        if self.schedule is not None:
            value = self.schedule(step)
            try:
                scheduled = float(value)
            except (TypeError, ValueError):
                raise InputError(f"`lr_schedule` must return a number, the factor of the learning rate at a step. "
                                    f"Received: lr_schedule({step})={value!r}") from None
            if not (math.isfinite(scheduled) and scheduled >= 0):
                raise InputError(f"`lr_schedule` must return a finite, non-negative factor. Received: "
                                    f"lr_schedule({step})={scheduled}")
            factor *= scheduled
        return factor

    def apply(self, step: int, batch_size: int) -> None:
        """Set every group's lr for the next update (only touches the optimizer when it changes)."""
        if self.scheduler is not None:
            return  # the scheduler sets the lrs (scaled once by begin())
        factor = 1.0 if self.constant else self.factor(step, batch_size)
        if factor != self._factor:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            self._factor = factor

    def begin(self, batch_size: int) -> None:
        """Before the first step: with a torch scheduler, scale its lrs once by the batch-size rule."""
        o = self.options
        if self.scheduler is None or self._scaled_for_scheduler or o.lr_scaling is None:
            return
        assert o.base_batch_size is not None
        factor = min(scale_lr(1.0, o.base_batch_size, batch_size, o.lr_scaling), self.rule_cap)
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        self._scaled_for_scheduler = True

    def after_update(self) -> None:
        """After each update: step a torch scheduler that runs per step."""
        if self.scheduler is not None and self.options.lr_schedule_interval == "step" and not self._plateau:
            self.scheduler.step()

    def after_epoch(self, record: dict[str, Any]) -> None:
        """After each epoch: step a per-epoch torch scheduler (ReduceLROnPlateau with ``val_loss``, else ``loss``)."""
        if self.scheduler is None:
            return
        if self._plateau:
            self.scheduler.step(record.get("val_loss", record["loss"]))
        elif self.options.lr_schedule_interval == "epoch":
            self.scheduler.step()

    @property
    def _plateau(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def state_dict(self) -> dict[str, Any] | None:
        """A torch scheduler's state (``None`` without one): part of every checkpoint."""
        return None if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a torch scheduler's state saved by :meth:`state_dict`."""
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)
            self._scaled_for_scheduler = True

    def invalidate(self) -> None:
        """Forget the applied factor (after a state load) so that the next :meth:`apply` sets it again."""
        self._factor = float("nan")

    def _adascale_gain(self, batch_size: int) -> float:
        """AdaScale's gain for ``batch_size`` over ``base_batch_size`` (1 until measured)."""
        base = self.options.base_batch_size
        assert base is not None
        scale = batch_size / base
        tracker = self.tracker
        if scale <= 1 or tracker is None or tracker.count == 0 or not math.isfinite(tracker.grad_sq):
            return 1.0 if scale >= 1 else scale
        return adascale_gain(tracker.grad_sq, tracker.trace_cov, scale, base)


def _torch_scheduler(schedule: Any, optimizer: torch.optim.Optimizer, options: TrainerOptions) -> Any:
    """``schedule`` when it is one of torch's lr schedulers (checked against the run), else ``None``."""
    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if not isinstance(schedule, schedulers):
        return None
    if schedule.optimizer is not optimizer:
        raise expected("lr_schedule", "a torch lr scheduler of the Trainer's optimizer", "one of another optimizer")
    if options.warmup_steps:
        raise expected("warmup_steps", "0 with a torch lr scheduler (warm up with torch.optim.lr_scheduler."
                       "LinearLR inside a SequentialLR)", options.warmup_steps)
    if options.lr_scaling == "adascale" or options.batch_size == "adaptive":
        raise expected("lr_schedule", "a step -> factor function with lr_scaling='adascale' or adaptive batches "
                       "(their lr changes with the measured noise, which a torch scheduler cannot follow)",
                       type(schedule).__name__)
    return schedule
