"""Small shared maths: a weighted least-squares line and an exponential moving average."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Line:
    """The weighted least-squares line ``y = intercept + slope·x`` and what its errors need."""

    intercept: float
    slope: float
    mean_x: float  # weighted mean of x
    spread: float  # Σ w (x − mean_x)²
    weights: tuple[float, ...]

    def standard_errors(self, xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
        """Standard errors of ``(intercept, slope)`` from the weighted scatter about the line (inf under 3 points)."""
        if len(xs) < 3:
            return math.inf, math.inf
        residuals = (y - self.intercept - self.slope * x for x, y in zip(xs, ys))
        scatter = sum(w * r**2 for w, r in zip(self.weights, residuals)) / (len(xs) - 2)
        return (math.sqrt(scatter * (1.0 / sum(self.weights) + self.mean_x**2 / self.spread)),
                math.sqrt(scatter / self.spread))


def fit_line(xs: Sequence[float], ys: Sequence[float], weights: Sequence[float] | None = None) -> Line:
    """Weighted least squares of ``y = a + b·x`` (equal weights by default); needs two distinct ``x``."""
    w = [1.0] * len(xs) if weights is None else [float(v) for v in weights]
    total = sum(w)
    mean_x = sum(wi * x for wi, x in zip(w, xs)) / total
    mean_y = sum(wi * y for wi, y in zip(w, ys)) / total
    spread = sum(wi * (x - mean_x) ** 2 for wi, x in zip(w, xs))
    slope = sum(wi * (x - mean_x) * (y - mean_y) for wi, x, y in zip(w, xs, ys)) / spread
    return Line(mean_y - slope * mean_x, slope, mean_x, spread, tuple(w))


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average ``a_t = β·a_{t−1} + (1 − β)·x_t``, divided by ``1 − β^t``.

    Non-finite values are skipped (the average carries over; ``nan`` before the first finite one).
    """
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = beta * average + (1 - beta) * value
            weight = beta * weight + (1 - beta)
        out.append(average / weight if weight else math.nan)
    return out
