"""Learning-rate rules: scaling with the batch size, warm-up, and AdaScale's gain.

Plain functions of numbers, so a trainer, a schedule (``step -> multiplier``, as
``torch.optim.lr_scheduler.LambdaLR`` takes) or a user can call them alike.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import check_choice, check_positive_int, expected

LR_RULES = ("linear", "sqrt")


def _check_positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise expected(name, "a positive finite number", value)
    return float(value)


def scale_lr(lr: float, from_batch: int, to_batch: int, rule: str = "linear") -> float:
    """The learning rate for batch size ``to_batch`` given one that works at ``from_batch``.

    ``"linear"``: ``lr · to_batch / from_batch`` — the linear scaling rule for SGD (Goyal et al.
    2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour"); combine it with
    :func:`warmup` when the factor is large. ``"sqrt"``: ``lr · sqrt(to_batch / from_batch)``,
    which keeps the gradient noise constant (Krizhevsky 2014, "One weird trick for
    parallelizing convolutional neural networks") and is the rule for Adam-type optimizers
    (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms").
    Both rules hold only below the critical batch size (see
    :func:`~batchfit.estimate_noise_scale`).
    """
    lr = _check_positive_number("lr", lr)
    check_positive_int("from_batch", from_batch)
    check_positive_int("to_batch", to_batch)
    check_choice("rule", rule, LR_RULES)
    ratio = to_batch / from_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def warmup(step: int, warmup_steps: int, start: float = 0.0) -> float:
    """Learning-rate multiplier of a linear warm-up at ``step`` (counted from 0).

    ``start + (1 − start) · min(1, (step + 1) / warmup_steps)``: it rises in equal increments
    from ``start`` and reaches 1 at step ``warmup_steps − 1`` (step 0 already takes the first
    increment, so no step is spent at ``start · lr``); ``warmup_steps=0`` means no warm-up.
    Goyal et al. (2017) warm up over 5 epochs from the small-batch learning rate, i.e.
    ``start = 1/k`` after a linear scaling by ``k``.
    """
    check_positive_int("step", step, allow_zero=True)
    check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start <= 1:
        raise expected("start", "a number in [0, 1]", start)
    if warmup_steps == 0:
        return 1.0
    return start + (1.0 - start) * min(1.0, (step + 1) / warmup_steps)


def adascale_gain(grad_sq: float, trace_cov: float, scale: float, base_batch: int = 1) -> float:
    """AdaScale's gain ratio: how many base-batch steps one step at ``scale`` times the batch is worth.

    ``r = (σ² + μ²) / (σ²/S + μ²)`` with ``μ² = |G|²`` (``grad_sq``), ``σ² = tr(Σ) / base_batch``
    the gradient variance of one base batch (``trace_cov`` is the per-sample ``tr(Σ)`` of
    :func:`~batchfit.estimate_noise_scale`) and ``S = scale`` (Johnson et al. 2020, "AdaScale
    SGD: A User-Friendly Algorithm for Distributed Training"). Multiply the base learning rate
    by ``r`` and advance the schedule by ``r`` per step. Noisy estimates are clipped: the result
    always lies in ``[1, scale]``.
    """
    scale = _check_positive_number("scale", scale)
    if scale < 1:
        raise expected("scale", "a number >= 1 (the batch size divided by the base batch size)", scale)
    check_positive_int("base_batch", base_batch)
    for name, value in (("grad_sq", grad_sq), ("trace_cov", trace_cov)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise expected(name, "a number", value)
    mu_sq = max(float(grad_sq), 0.0)
    sigma_sq = max(float(trace_cov), 0.0) / base_batch
    if mu_sq == 0.0:
        return scale if sigma_sq > 0 else 1.0
    if math.isinf(sigma_sq) or math.isinf(mu_sq):
        return scale if math.isinf(sigma_sq) and not math.isinf(mu_sq) else 1.0
    gain = (sigma_sq + mu_sq) / (sigma_sq / scale + mu_sq)
    return min(max(gain, 1.0), scale)
