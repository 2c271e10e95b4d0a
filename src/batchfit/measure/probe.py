"""One probe for ``batch_size="auto"``: step time and gradient noise from the same passes.

Choosing a batch size needs two measurements at the current weights: how long a step takes
at each candidate size, and the gradient noise scale. Both come from forward and backward
passes over random batches, so one set of passes serves both: every pass is timed, and the
squared norm of its gradient is one point on the line ``E|G_B|² = |G|² + tr(Σ)/B`` that
:func:`~batchfit.measure.noise.noise_from_sizes` fits, as is the mean gradient of all passes
together (the whole probe's samples as one large batch, as in McCandlish et al.'s estimator).
Sizes are probed in ascending order and the probe stops once a size is well past the noise
scale measured so far, where bigger batches only waste samples, so large sizes are never timed
for nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.batch import param_dtype, to_device
from ..core.device import synchronize
from ..core.grads import squared_grad_norm
from ..core.maths import fit_line
from ..core.precision import PRECISIONS
from ..core.step import Step
from ..data.sources import Source
from ..errors import check_choice
from .noise import noise_fit_errors, noise_from_sizes, simple_noise_scale
from .state import probe


@dataclass(frozen=True)
class BatchProbe:
    """What :func:`probe_batch_sizes` measured.

    ``pass_seconds[B]`` is the fastest gather of ``B`` samples plus forward + backward over them (other load on the
    machine only ever adds time), ``update_seconds`` the fastest optimizer step (0 without an
    optimizer); ``grad_sq``, ``trace_cov`` and ``b_simple`` are the noise-scale estimates fitted
    to the squared gradient norms of all passes.
    """

    pass_seconds: dict[int, float]
    update_seconds: float
    grad_sq: float
    trace_cov: float
    passes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    grad_sq_error: float = math.inf
    trace_cov_error: float = math.inf
    spread: dict[int, float] = field(default_factory=dict)  # second-fastest pass over the fastest, minus 1

    @property
    def b_simple(self) -> float:
        """``tr(Σ) / |G|²`` of the fitted estimates (``inf`` when ``|G|²`` is not positive)."""
        return simple_noise_scale(self.grad_sq, self.trace_cov)

    @property
    def b_simple_low(self) -> float:
        """A cautious noise scale: ``tr(Σ)`` one standard error lower over ``|G|²`` one higher."""
        return simple_noise_scale(self.grad_sq + self.grad_sq_error, self.trace_cov - self.trace_cov_error)

    def step_seconds(self, size: int) -> float:
        """Time of one training step at ``size``: forward, backward and the optimizer step.

        Forward + backward follows the line ``α + β·B`` fitted to the fastest pass of every size
        probed, the compute-time model of Pollux (Qiao et al., OSDI 2021): a fixed cost per pass
        plus a cost per sample. One line through all sizes is steadier than each size's own
        few passes; where it does not fit (a slope that is not positive, a negative fixed cost)
        the measured times count.
        """
        line = _line(self.pass_seconds)
        if line is None:
            return self.pass_seconds[size] + self.update_seconds
        fixed, per_sample = line
        return max(fixed + per_sample * size, 1e-12) + self.update_seconds

    def throughput(self, size: int) -> float:
        """Samples per second of training steps at ``size``."""
        return size / self.step_seconds(size)


def _line(points: dict[int, float]) -> tuple[float, float] | None:
    """Least-squares ``(α, β)`` of ``t = α + β·B`` through ``points``; ``None`` unless ``β > 0`` and ``α ≥ 0``."""
    if len(points) < 2:
        return None
    line = fit_line(list(points), list(points.values()))
    if not line.slope > 0 or line.intercept < 0:
        return None  # not the shape of compute time: the measured times are all there is to go by
    return line.intercept, line.slope


def probe_batch_sizes(model: torch.nn.Module, loss_fn: Any, src: Source, sizes: list[int], device: torch.device,
                      optimizer: torch.optim.Optimizer | None = None, min_passes: int = 2, window: float = 0.0,
                      max_passes: int = 32, stop_above_noise: float | None = 4.0, seed: int = 0,
                      precision: str = "fp32", agreement: float = 0.15, agree_passes: int = 6) -> BatchProbe:
    """Time forward + backward at each of ``sizes`` and fit the noise scale to the same passes.

    Each size gets passes until there are ``min_passes`` of them and ``window`` seconds have
    passed (at most ``max_passes``), each over a fresh batch drawn with replacement so that the
    squared norms are independent draws; then the last batch is timed again until the two fastest
    passes agree within ``agreement`` (at most ``agree_passes`` in all: on a loaded machine single
    passes swing many times over; these repeats add no noise point, so the estimate does not
    depend on timing). The fastest pass of a size is its time. With
    ``stop_above_noise``, sizes stop once one is that many times the noise scale measured so
    far. Every pass is the training step's own forward and backward under ``precision``
    (:class:`~batchfit.core.step.Step`: autocast for bf16/fp16, fp16 losses scaled and the norms
    unscaled). Model, optimizer and random state are left as they were.
    """
    check_choice("precision", precision, PRECISIONS)
    rng = np.random.default_rng(seed)
    begin = time.perf_counter()
    pass_seconds: dict[int, float] = {}
    passes: dict[int, int] = {}
    spreads: dict[int, float] = {}
    drawn: list[int] = []
    norms: list[float] = []
    update = 0.0
    with probe(model, optimizer, device) as (net, opt):
        net.train()
        step = Step(net, loss_fn, None, device=device, precision=precision)  # gradients only
        params, dtype = step.params, param_dtype(net)
        # The mean gradient over every sample drawn so far: one more point, of the largest size.
        union = [torch.zeros_like(p) for p in params]

        def fitted() -> tuple[list[int], list[float]]:
            total = sum(drawn)
            return [*drawn, total], [*norms, squared_grad_norm(g / total for g in union)]

        for size in sorted(sizes):
            times: list[float] = []
            gathers: list[float] = []
            while (needed := len(times) < min_passes or (sum(times) < window and len(times) < max_passes)) or (
                    len(times) < agree_passes and not _agree(times, agreement)):
                if needed:  # a fresh draw: a point for the noise scale
                    start = time.perf_counter()
                    batch = to_device(src.gather(rng.integers(0, len(src), size)), device, dtype)
                    synchronize(device)
                    gathers.append(time.perf_counter() - start)
                step.skip()
                start = time.perf_counter()
                step.accumulate(batch, size)
                synchronize(device)
                times.append(time.perf_counter() - start)
                if not needed:
                    continue  # timed again on the same batch until the timings agree; no new point
                norm = step.grad_sq()
                if not math.isfinite(norm):
                    continue  # an fp16 overflow: timed, but no point for the noise scale
                drawn.append(size)
                norms.append(norm)
                for total, param in zip(union, params):
                    if param.grad is not None:
                        total.add_(param.grad, alpha=size / step.grad_scale())
            # The fastest pass counts: a first pass at a new size that pays for allocations is not it.
            # Gathering the batch is part of every step: on a small model it is much of it (a linear
            # regression's step took 1.26× as long at 1024 as at 512; forward and backward alone, 1.05×).
            pass_seconds[size], passes[size] = min(times) + min(gathers), len(times)
            spreads[size] = _spread(times)
            if stop_above_noise is not None and len(set(drawn)) >= 2:
                grad_sq, trace_cov = noise_from_sizes(*fitted())
                if size >= stop_above_noise * simple_noise_scale(grad_sq, trace_cov):
                    break
        points = fitted() if len(set(drawn)) >= 2 else None  # one size says nothing of how the noise scales
        if opt is not None:
            update = _time_updates(opt, device)
        step.skip()
    if points is None:
        return BatchProbe(pass_seconds, update, math.nan, math.nan, passes, time.perf_counter() - begin,
                          spread=spreads)
    grad_sq, trace_cov = noise_from_sizes(*points)
    errors = noise_fit_errors(*points)
    return BatchProbe(pass_seconds, update, grad_sq, trace_cov, passes, time.perf_counter() - begin, *errors,
                      spread=spreads)


def _spread(times: list[float]) -> float:
    """How far the second-fastest pass is above the fastest, as a fraction (0 for a single pass)."""
    fastest = sorted(times)[:2]
    return fastest[1] / fastest[0] - 1 if len(fastest) == 2 and fastest[0] > 0 else 0.0


def _agree(times: list[float], agreement: float) -> bool:
    return len(times) >= 2 and _spread(times) <= agreement


def _time_updates(optimizer: torch.optim.Optimizer, device: torch.device, repeats: int = 3) -> float:
    """The fastest of a few optimizer steps on the gradients in place (the first one warms up)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])
