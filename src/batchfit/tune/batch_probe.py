"""One probe for ``batch_size="auto"``: step time and gradient noise from the same passes.

Choosing a batch size needs two measurements at the current weights: how long a step takes
at each candidate size, and the gradient noise scale. Both come from forward and backward
passes over random batches, so one set of passes serves both: every pass is timed, and the
squared norm of its gradient is one point on the line ``E|G_B|² = |G|² + tr(Σ)/B`` that
:func:`~batchfit.tune.noise.noise_from_sizes` fits, as is the mean gradient of all passes
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

from ..data.sources import Source
from ..train.batch import forward_loss
from ..train.settings import autocast
from .noise import noise_fit_errors, noise_from_sizes, simple_noise_scale, squared_grad_norm
from .state import batch_to, probe


@dataclass(frozen=True)
class BatchProbe:
    """What :func:`probe_batch_sizes` measured.

    ``pass_seconds[B]`` is the fastest forward + backward over ``B`` samples (other load on the
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
    sizes, times = list(points), list(points.values())
    mean_b, mean_t = sum(sizes) / len(sizes), sum(times) / len(times)
    spread = sum((b - mean_b) ** 2 for b in sizes)
    per_sample = sum((b - mean_b) * (t - mean_t) for b, t in zip(sizes, times)) / spread
    fixed = mean_t - per_sample * mean_b
    if not per_sample > 0 or fixed < 0:
        return None  # not the shape of compute time: the measured times are all there is to go by
    return fixed, per_sample


def probe_batch_sizes(model: torch.nn.Module, loss_fn: Any, src: Source, sizes: list[int], device: torch.device,
                      optimizer: torch.optim.Optimizer | None = None, min_passes: int = 2, window: float = 0.0,
                      max_passes: int = 32, stop_above_noise: float | None = 4.0, seed: int = 0,
                      precision: str = "fp32") -> BatchProbe:
    """Time forward + backward at each of ``sizes`` and fit the noise scale to the same passes.

    Each size gets passes until there are ``min_passes`` of them and ``window`` seconds have
    passed (at most ``max_passes``), each over a fresh batch drawn with replacement so that the
    squared norms are independent draws; the fastest pass of a size is its time. With
    ``stop_above_noise``, sizes stop once one is that many times the noise scale measured so
    far. ``precision`` (``"bf16"``, ``"fp16"``) runs the forward pass under autocast, as
    training will; fp16 losses are scaled for the backward pass and the gradients unscaled, as a
    GradScaler does. Model, optimizer and random state are left as they were.
    """
    rng = np.random.default_rng(seed)
    begin = time.perf_counter()
    forward_context = autocast(precision, device.type)
    scale = 2.0**12 if precision == "fp16" else 1.0  # keeps small fp16 gradients from underflowing
    pass_seconds: dict[int, float] = {}
    passes: dict[int, int] = {}
    drawn: list[int] = []
    norms: list[float] = []
    update = 0.0
    with probe(model, optimizer, device) as (net, opt):
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        # The mean gradient over every sample drawn so far: one more point, of the largest size.
        union = [torch.zeros_like(p) for p in params]

        def fitted() -> tuple[list[int], list[float]]:
            total = sum(drawn)
            return [*drawn, total], [*norms, squared_grad_norm(g / total for g in union)]

        for size in sorted(sizes):
            times: list[float] = []
            while len(times) < min_passes or (sum(times) < window and len(times) < max_passes):
                batch = batch_to(src.gather(rng.integers(0, len(src), size)), device)
                net.zero_grad(set_to_none=True)
                start = time.perf_counter()
                with forward_context:
                    loss, _ = forward_loss(net, loss_fn, batch)
                (loss * scale).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                if scale != 1.0:
                    for param in params:
                        if param.grad is not None:
                            param.grad.div_(scale)
                norm = squared_grad_norm(p.grad for p in params)
                if not math.isfinite(norm):
                    continue  # an fp16 overflow: timed, but no point for the noise scale
                drawn.append(size)
                norms.append(norm)
                for total, param in zip(union, params):
                    if param.grad is not None:
                        total.add_(param.grad, alpha=size)
            # The fastest pass counts: a first pass at a new size that pays for allocations is not it.
            pass_seconds[size], passes[size] = min(times), len(times)
            if stop_above_noise is not None and len(set(drawn)) >= 2:
                grad_sq, trace_cov = noise_from_sizes(*fitted())
                if size >= stop_above_noise * simple_noise_scale(grad_sq, trace_cov):
                    break
        points = fitted() if len(set(drawn)) >= 2 else None  # one size says nothing of how the noise scales
        if opt is not None:
            update = _time_updates(opt, device)
        net.zero_grad(set_to_none=True)
    if points is None:
        return BatchProbe(pass_seconds, update, math.nan, math.nan, passes, time.perf_counter() - begin)
    grad_sq, trace_cov = noise_from_sizes(*points)
    errors = noise_fit_errors(*points)
    return BatchProbe(pass_seconds, update, grad_sq, trace_cov, passes, time.perf_counter() - begin, *errors)


def _time_updates(optimizer: torch.optim.Optimizer, device: torch.device, repeats: int = 3) -> float:
    """The fastest of a few optimizer steps on the gradients in place (the first one warms up)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])
