"""The learning-rate range test: train briefly with an exponentially growing learning rate.

Smith (2017), "Cyclical Learning Rates for Training Neural Networks", section 3.3, in the
exponential form popularised by fastai: the loss first barely moves, then falls, then blows
up. A good learning rate is where it falls fastest.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.batch import LossFn, param_dtype, to_device
from ..core.device import resolve_device
from ..core.figures import new_figure, save_figure
from ..core.maths import ema
from ..core.precision import PRECISIONS
from ..core.step import Step
from ..data.batcher import Batcher
from ..data.sources import as_source
from ..errors import InputError, check_choice, check_positive_int, expected
from .state import probe

logger = logging.getLogger(__name__)


def exponential_lrs(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` learning rates from ``min_lr`` to ``max_lr``, equally spaced in ``log lr``."""
    if num_steps == 1:
        return [float(min_lr)]
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]


def smooth(losses: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average: ``a_t = s·x_t + (1 − s)·a_{t−1}``, divided by ``1 − (1 − s)^t``."""
    return ema(losses, beta=1 - smoothing)


def steepest_descent_lr(lrs: Sequence[float], losses: Sequence[float], skip_start: int = 0) -> float | None:
    """The learning rate where ``d loss / d log(lr)`` is most negative, before the loss minimum.

    The first ``skip_start`` points are left out of the search (a moving average of only a few
    losses is too noisy to read a slope from). ``None`` when fewer than 3 points remain up to
    the minimum or the loss does not fall there.
    """
    stop = int(np.argmin(losses)) + 1
    if stop - skip_start < 3:
        return None
    start_loss = losses[skip_start]
    if start_loss - losses[stop - 1] <= 1e-6 * abs(start_loss):
        return None  # a fall within rounding error is no fall
    log_lrs = np.log(np.asarray(lrs[skip_start:stop], dtype=float))
    slopes = np.gradient(np.asarray(losses[skip_start:stop], dtype=float), log_lrs)
    best = int(np.argmin(slopes))
    return float(lrs[skip_start + best]) if slopes[best] < 0 else None


@dataclass(frozen=True)
class LRRangeResult:
    """What :func:`lr_range_test` saw: learning rates, losses (smoothed and raw), suggestion."""

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    raw_losses: tuple[float, ...]
    suggested_lr: float
    diverged: bool

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the smoothed loss against the learning rate (log axis), marking the suggestion."""
        path = Path(path)
        figure, grid = new_figure(1, 1, (6, 4))
        axes = grid[0][0]
        axes.plot(self.lrs, self.raw_losses, color="0.75", linewidth=0.8, label="loss")
        axes.plot(self.lrs, self.losses, color="C0", label="smoothed loss")
        axes.axvline(self.suggested_lr, color="C3", linestyle="--", label=f"suggested lr = {self.suggested_lr:.3g}")
        axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.set_ylabel("loss")
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:  # keep the blow-up from squashing the part that matters, but show every raw loss up to it
            end = finite.index(min(finite)) + 1
            shown = [v for v in (*self.raw_losses[:end], *finite[:end]) if math.isfinite(v)]
            low, top = min(shown), max(shown)
            span = (top - low) or abs(top) or 1.0
            axes.set_ylim(low - 0.1 * span, top + 0.25 * span)
        axes.legend()
        axes.set_title("learning-rate range test")
        save_figure(figure, path)
        return path


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, ratios: Sequence[float]) -> None:
    # Groups keep their relative learning rates (e.g. a smaller lr for a pretrained backbone).
    for group, ratio in zip(optimizer.param_groups, ratios):
        group["lr"] = lr * ratio


def _check_args(min_lr: Any, max_lr: Any, smoothing: Any, diverge_factor: Any) -> None:
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr), ("diverge_factor", diverge_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise expected(name, "a positive finite number", value)
    if max_lr <= min_lr:
        raise expected("max_lr", f"larger than min_lr={min_lr}", max_lr)
    if diverge_factor <= 1:
        raise expected("diverge_factor", "a number larger than 1", diverge_factor)
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 < smoothing <= 1:
        raise expected("smoothing", "a number in (0, 1]", smoothing)


def lr_range_test(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer,
    src: Any,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    batch_size: int = 64,
    smoothing: float = 0.05,
    diverge_factor: float = 4.0,
    seed: int = 0,
    device: str | torch.device = "auto",
    micro_batch_size: int | None = None,
    precision: str = "fp32",
) -> LRRangeResult:
    """Train ``num_steps`` steps with the learning rate rising exponentially from ``min_lr`` to ``max_lr``.

    Each step is a real training step on a fresh batch of ``batch_size`` samples (split into
    micro-batches of ``micro_batch_size`` when given), the training step itself under
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``). The test stops early once the smoothed
    loss exceeds ``diverge_factor`` times the best one so far, or turns non-finite. The
    suggestion is the learning rate where the smoothed loss falls fastest per unit of
    ``log(lr)``, leaving out the first ``1/(2·smoothing)`` steps whose average is still noisy,
    capped at a tenth of the learning rate of the lowest loss (the steepest descent can sit just
    below the blow-up); when the loss never falls, that tenth. Model,
    optimizer (state and learning rates) and random state are restored exactly.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise expected("optimizer", "a torch.optim.Optimizer", type(optimizer).__name__)
    _check_args(min_lr, max_lr, smoothing, diverge_factor)
    check_positive_int("num_steps", num_steps)
    check_positive_int("batch_size", batch_size)
    if micro_batch_size is not None:
        check_positive_int("micro_batch_size", micro_batch_size)
    check_choice("precision", precision, PRECISIONS)
    source = as_source(src, "src")
    batch_size = min(batch_size, len(source))
    batches = iter(_endless(Batcher(source, batch_size=batch_size, shuffle=True, drop_last=True, seed=seed)))
    target = resolve_device(device, model)
    base = optimizer.param_groups[0]["lr"]
    ratios = [group["lr"] / base if base else 1.0 for group in optimizer.param_groups]
    lrs: list[float] = []
    raw: list[float] = []
    smoothed: list[float] = []
    diverged = False
    with probe(model, optimizer, target) as (net, opt):
        assert opt is not None
        net.train()
        step, dtype = Step(net, loss_fn, opt, device=target, precision=precision,
                           micro_batch_size=micro_batch_size), param_dtype(net)
        # Dropout and the like draw from the global generators; probe() restores them afterwards.
        torch.default_generator.manual_seed(seed)
        if target.type == "cuda":
            with torch.cuda.device(target):
                torch.cuda.manual_seed(seed)
        for lr in exponential_lrs(min_lr, max_lr, num_steps):
            _set_lr(opt, lr, ratios)
            step.skip()
            loss = float(step.run(to_device(next(batches), target, dtype)))  # one device sync per step
            lrs.append(lr)
            raw.append(loss)
            if not math.isfinite(loss):
                diverged = True
                smoothed.append(math.inf)
                break
            smoothed.append(smooth(raw, smoothing)[-1])
            if _diverged(smoothed[-1], min(smoothed), diverge_factor):
                diverged = True
                break
    if not math.isfinite(raw[0]):
        raise InputError(f"The loss is not finite even at min_lr={min_lr}: lower `min_lr` or check the model.")
    finite = len(smoothed) - (not math.isfinite(smoothed[-1]))
    # The moving average rests on ~1/smoothing losses; skip the steps before it has half of them.
    skip = min(math.ceil(0.5 / smoothing), finite // 4)
    steepest = steepest_descent_lr(lrs[:finite], smoothed[:finite], skip)
    # The steepest descent can sit just below divergence; a tenth of the lr of the lowest loss is
    # the classic cap (Smith 2017): the loss still falls there, well away from the blow-up.
    lowest_tenth = lrs[int(np.argmin(smoothed[:finite]))] / 10
    suggestion = None if steepest is None else min(steepest, lowest_tenth)
    if suggestion is None:
        suggestion = lrs[int(np.argmin(smoothed[:finite]))] / 10
        warnings.warn(
            "The loss did not fall during the learning-rate range test; suggesting a tenth of the learning "
            f"rate of the lowest loss ({suggestion:.3g}). Widen min_lr/max_lr or add steps.",
            stacklevel=2,
        )
    logger.info("lr range test: %d steps%s, suggested lr %.3g", len(lrs), " (diverged)" if diverged else "", suggestion)
    return LRRangeResult(tuple(lrs), tuple(smoothed), tuple(raw), suggestion, diverged)


def _diverged(loss: float, best: float, factor: float) -> bool:
    """``loss > factor · best`` for positive losses, stated so that it also works for negative ones."""
    return loss - best > (factor - 1) * abs(best)


def _endless(batcher: Batcher) -> Any:
    while True:
        yield from batcher
