"""The learning rate of each update: one function of the step and the batch size.

lr = base lr × batch-size rule × warm-up × user schedule, where the rule is ``lr_scaling``
(linear or square-root scaling from ``base_batch_size``, or AdaScale's gain from the measured
gradient noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import BatchfitError
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

    def __init__(self, optimizer: torch.optim.Optimizer, options: TrainerOptions,
                 schedule: Callable[[int], float] | None) -> None:
        self.optimizer, self.options, self.schedule = optimizer, options, schedule
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.tracker: NoiseScaleTracker | None = None
        self.start_batch: int | None = None  # adaptive runs: the batch the rule scales to
        self.constant = options.lr_scaling is None and not options.warmup_steps and schedule is None
        # Whether the lr can change from one step to the next (not only from one fit to the next).
        self.dynamic = bool(options.warmup_steps or schedule is not None or options.batch_size == "adaptive"
                            or options.lr_scaling == "adascale")
        self._factor = float("nan")
        self.lr = float("nan")

    def factor(self, step: int, batch_size: int) -> float:
        """Batch-size rule × warm-up × user schedule for the update after ``step`` steps at ``batch_size``."""
        o = self.options
        factor = 1.0
        if o.lr_scaling == "adascale":
            factor = self._adascale_gain(batch_size)
        elif o.lr_scaling is not None:
            assert o.base_batch_size is not None
            factor = scale_lr(1.0, o.base_batch_size, self.start_batch or batch_size, o.lr_scaling)
        if o.warmup_steps:
            factor *= warmup(step, o.warmup_steps)
        if self.schedule is not None:
            scheduled = float(self.schedule(step))
            if not (math.isfinite(scheduled) and scheduled >= 0):
                raise BatchfitError(f"`lr_schedule` must return a finite, non-negative factor. Received: "
                                    f"lr_schedule({step})={scheduled}")
            factor *= scheduled
        return factor

    def apply(self, step: int, batch_size: int) -> None:
        """Set every group's lr for the next update (only touches the optimizer when it changes)."""
        factor = 1.0 if self.constant else self.factor(step, batch_size)
        if factor != self._factor:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            self._factor = factor
            self.lr = self.optimizer.param_groups[0]["lr"]

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

