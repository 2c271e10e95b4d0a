"""The gradient noise scale: the batch size above which bigger batches stop paying off.

McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch Training",
arXiv:1812.06162. With ``G`` the true gradient and ``Σ`` the per-sample gradient covariance,
the *simple noise scale* is ``B_simple = tr(Σ) / |G|²``; training at batch sizes well below it
wastes steps, well above it wastes samples. Neither ``|G|²`` nor ``tr(Σ)`` can be measured
directly, but the squared norm of a batch gradient ``G_B`` (the mean of ``B`` per-sample
gradients drawn independently) has expectation ``E|G_B|² = |G|² + tr(Σ)/B``, so measuring it at
two batch sizes gives unbiased estimates of both (the paper's Appendix A).

The estimators are plain functions so that a training loop can feed them the gradient of one
micro-batch (small) and of the whole batch (big) at every step; :class:`NoiseScaleTracker`
averages them over steps.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.batch import LossFn, micro_batches, param_dtype, to_device
from ..core.device import resolve_device
from ..core.grads import squared_grad_norm
from ..core.maths import Line, fit_line
from ..core.precision import PRECISIONS
from ..core.step import Step
from ..data.sources import as_source
from ..errors import check_choice, check_positive_int, check_seed, expected
from .state import probe

logger = logging.getLogger(__name__)


def _check_batches(b_small: float, b_big: float) -> None:
    if not b_small > 0:
        raise expected("b_small", "a positive batch size", b_small)
    if not b_big > b_small:
        raise expected("b_big", f"a batch size larger than b_small={b_small}", b_big)


def grad_sq_estimate(small_sq: float, big_sq: float, b_small: float, b_big: float) -> float:
    """Unbiased estimate of ``|G|²``, the squared norm of the true gradient.

    ``|G|² ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)``, where ``small_sq`` and
    ``big_sq`` are squared norms of mean gradients over ``b_small`` and ``b_big`` samples
    (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", eq. A.2). One
    measurement is very noisy and may be negative: average many before dividing.
    """
    _check_batches(b_small, b_big)
    return (b_big * big_sq - b_small * small_sq) / (b_big - b_small)


def trace_cov_estimate(small_sq: float, big_sq: float, b_small: float, b_big: float) -> float:
    """Unbiased estimate of ``tr(Σ)``, the summed variance of per-sample gradients.

    ``tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)``, with the same inputs as
    :func:`grad_sq_estimate` (McCandlish et al. 2018, eq. A.3).
    """
    _check_batches(b_small, b_big)
    return (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)


def _weighted_line(sizes: Sequence[float], squared_norms: Sequence[float]) -> Line:
    """The least-squares line of ``|G_B|²`` against ``1/B``, weighted by ``B``."""
    if len(sizes) != len(squared_norms):
        raise expected("squared_norms", f"one value per size ({len(sizes)})", len(squared_norms))
    inverse = [1.0 / size for size in sizes]
    if len(set(inverse)) < 2:
        raise expected("sizes", "at least two distinct batch sizes", sorted(set(sizes)))
    return fit_line(inverse, squared_norms, sizes)


def noise_from_sizes(sizes: Sequence[float], squared_norms: Sequence[float]) -> tuple[float, float]:
    """Unbiased ``(|G|², tr(Σ))`` from squared batch-gradient norms measured at several batch sizes.

    ``squared_norms[i]`` is ``|G_B|²`` of a batch of ``sizes[i]`` samples drawn independently
    (a point may also be the mean gradient of several such batches together, with their total
    size). Since ``E|G_B|² = |G|² + tr(Σ)·(1/B)`` is exactly linear in ``1/B``, a least-squares
    line through the points ``(1/B, |G_B|²)`` has unbiased intercept ``|G|²`` and slope
    ``tr(Σ)`` for any fixed weights. The points are weighted by ``B``, as a bigger batch's
    squared norm scatters less. This extends McCandlish et al. (2018, Appendix A)'s two-size
    estimators to any number of sizes: with two sizes it is exactly :func:`grad_sq_estimate`
    and :func:`trace_cov_estimate` of each size's average. At least two distinct sizes are needed.
    """
    line = _weighted_line(sizes, squared_norms)
    return line.intercept, line.slope


def noise_fit_errors(sizes: Sequence[float], squared_norms: Sequence[float]) -> tuple[float, float]:
    """Standard errors of the ``(|G|², tr(Σ))`` that :func:`noise_from_sizes` fits to the same points.

    The weighted least-squares errors of intercept and slope, from the scatter of the points
    about the line (``inf`` with fewer than three points): a yardstick of how far the noise
    scale may be off, for decisions that must not trust a lucky estimate.
    """
    return _weighted_line(sizes, squared_norms).standard_errors([1.0 / size for size in sizes], squared_norms)


def simple_noise_scale(grad_sq: float, trace_cov: float) -> float:
    """``B_simple = tr(Σ) / |G|²`` (McCandlish et al. 2018, eq. 2.8).

    Feed it averaged estimates (a ratio of averages, not an average of ratios). A non-positive
    ``grad_sq`` means the noise swamps the signal at the batch sizes measured: ``inf``.
    """
    if grad_sq <= 0:
        return math.inf
    return max(trace_cov, 0.0) / grad_sq


class NoiseScaleTracker:
    """Exponential moving averages of the two noise-scale estimators, for use during training.

    Each :meth:`update` turns one pair of squared gradient norms into estimates of ``|G|²`` and
    ``tr(Σ)`` and folds each into its own moving average (with Adam's bias correction, so early
    values are not pulled towards zero). ``b_simple`` is the ratio of the two averages, as
    McCandlish et al. (2018, Appendix A) recommend. The squares of the ``|G|²`` estimates are averaged
    too, which gives the standard error of the averaged ``|G|²`` (:attr:`grad_sq_stderr`) and a lower
    confidence bound of the noise scale (:meth:`b_simple_lower`).
    """

    def __init__(self, beta: float = 0.99) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise expected("beta", "a number in [0, 1)", beta)
        self.beta = float(beta)
        self.count = 0
        self._grad_sq = 0.0
        self._trace_cov = 0.0
        self._grad_sq_sq = 0.0  # the moving average of the squared |G|² estimates

    def update(self, small_sq: float, big_sq: float, b_small: float, b_big: float) -> None:
        """Add one measurement: ``|G_small|²`` over ``b_small`` samples, ``|G_big|²`` over ``b_big``."""
        grad_sq = grad_sq_estimate(small_sq, big_sq, b_small, b_big)
        trace_cov = trace_cov_estimate(small_sq, big_sq, b_small, b_big)
        if not (math.isfinite(grad_sq) and math.isfinite(trace_cov)):
            return  # a non-finite gradient (e.g. an fp16 overflow step) says nothing about noise
        self.count += 1
        self._grad_sq = self.beta * self._grad_sq + (1 - self.beta) * grad_sq
        self._trace_cov = self.beta * self._trace_cov + (1 - self.beta) * trace_cov
        self._grad_sq_sq = self.beta * self._grad_sq_sq + (1 - self.beta) * grad_sq * grad_sq

    def _debiased(self, value: float) -> float:
        if self.count == 0:
            return math.nan
        return value / (1 - self.beta**self.count)

    @property
    def grad_sq(self) -> float:
        """Moving average of the ``|G|²`` estimates (``nan`` before the first update)."""
        return self._debiased(self._grad_sq)

    @property
    def trace_cov(self) -> float:
        """Moving average of the ``tr(Σ)`` estimates (``nan`` before the first update)."""
        return self._debiased(self._trace_cov)

    @property
    def b_simple(self) -> float:
        """The simple noise scale of the averages (``nan`` before the first update)."""
        if self.count == 0:
            return math.nan
        return simple_noise_scale(self.grad_sq, self.trace_cov)

    @property
    def grad_sq_stderr(self) -> float:
        """The standard error of :attr:`grad_sq`: the spread of the ``|G|²`` estimates (their weighted variance
        about the average) times the root of the sum of the average's squared weights, as if the measurements
        were independent (``nan`` before the first update). The weights of the debiased average are
        ``(1 - β) β^k / (1 - β^n)``, so the sum of their squares is
        ``(1 - β)(1 - β^2n) / ((1 + β)(1 - β^n)²)``: ``1/n`` for ``β → 1``, 1 for ``β = 0``."""
        if self.count == 0:
            return math.nan
        mean = self.grad_sq
        variance = max(0.0, self._debiased(self._grad_sq_sq) - mean * mean)
        beta, n = self.beta, self.count
        weights_sq = (1 - beta) * (1 - beta ** (2 * n)) / ((1 + beta) * (1 - beta**n) ** 2)
        return math.sqrt(variance * weights_sq)

    def b_simple_lower(self, z: float = 2.0) -> float:
        """A lower confidence bound of the simple noise scale: ``tr(Σ)`` over ``|G|²`` plus ``z`` standard errors
        (:attr:`grad_sq_stderr`). The averaged ``|G|²`` is the noisy one of the two (a difference of two noisy
        norms, small beside each); where it is within a few standard errors of zero, :attr:`b_simple` can be any
        size, and this bound stays near what the measurements show at least. ``nan`` before the first update
        and while the bound's denominator or the averaged ``tr(Σ)`` is not positive."""
        if self.count == 0:
            return math.nan
        high = self.grad_sq + z * self.grad_sq_stderr
        trace_cov = self.trace_cov
        if not (high > 0 and trace_cov > 0):
            return math.nan
        return trace_cov / high

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the averages after a restart."""
        return {"beta": self.beta, "count": self.count, "grad_sq": self._grad_sq, "trace_cov": self._trace_cov,
                "grad_sq_sq": self._grad_sq_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`. One written before the squares were averaged continues with a
        spread of zero (new measurements bring it back, at the pace of the average)."""
        self.beta = float(state["beta"])
        self.count = int(state["count"])
        self._grad_sq = float(state["grad_sq"])
        self._trace_cov = float(state["trace_cov"])
        if "grad_sq_sq" in state:
            self._grad_sq_sq = float(state["grad_sq_sq"])
        else:
            self._grad_sq_sq = self._grad_sq**2 / (1 - self.beta**self.count) if self.count else 0.0


@dataclass(frozen=True)
class NoiseScale:
    """The gradient noise scale measured by :func:`estimate_noise_scale`.

    ``b_simple = trace_cov / grad_sq``; ``grad_sq`` estimates ``|G|²`` and ``trace_cov``
    estimates ``tr(Σ)``, each averaged over all draws. ``small_sq[i]`` is the mean of
    ``|G_small|²`` over the small batches of draw ``i`` and ``big_sq[i]`` is ``|G_big|²`` of
    that draw, so every per-draw estimate can be recomputed.
    """

    b_simple: float
    grad_sq: float
    trace_cov: float
    small_batch: int
    big_batch: int
    small_sq: tuple[float, ...]
    big_sq: tuple[float, ...]

    @property
    def num_batches(self) -> int:
        """How many big batches were drawn."""
        return len(self.big_sq)


def _mean_grad(step: Step, batch: Any, size: int) -> list[torch.Tensor]:
    """Gradient of the mean loss of ``batch`` (``size`` samples), unscaled, through the training step."""
    step.skip()
    step.accumulate(batch, size)
    scale = step.grad_scale()
    return [torch.zeros_like(p) if p.grad is None else p.grad / scale for p in step.params]


def estimate_noise_scale(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    src: Any,
    small_batch: int = 32,
    big_batch: int = 512,
    num_batches: int = 10,
    seed: int = 0,
    device: str | torch.device = "auto",
    micro_batch_size: int | None = None,
    precision: str = "fp32",
) -> NoiseScale:
    """Measure the gradient noise scale of ``model`` on ``src`` at its current weights.

    Each of ``num_batches`` draws takes ``big_batch`` samples uniformly *with replacement* (so
    the samples are independent and the estimators exactly unbiased for the dataset), splits
    them into ``big_batch // small_batch`` small batches, and records the mean ``|G_small|²``
    over the small batches and ``|G_big|²`` of their mean. ``|G|²`` and ``tr(Σ)`` are
    estimated from the averages over draws and only then divided (McCandlish et al. 2018,
    Appendix A). ``micro_batch_size`` caps how many samples go through the model at once;
    every gradient comes from the training step itself under ``precision``.

    The model runs in training mode; weights, buffers, gradients, modes, random state are
    restored afterwards, and no optimizer is involved.
    """
    source = as_source(src, "src")
    check_positive_int("small_batch", small_batch)
    check_positive_int("big_batch", big_batch)
    check_positive_int("num_batches", num_batches)
    if micro_batch_size is not None:
        check_positive_int("micro_batch_size", micro_batch_size)
    if big_batch <= small_batch or big_batch % small_batch:
        raise expected("big_batch", f"a multiple of small_batch={small_batch} larger than it", big_batch)
    check_seed(seed, negative=True)  # any integer seeds a torch.Generator
    check_choice("precision", precision, PRECISIONS)
    target = resolve_device(device, model)
    generator = torch.Generator().manual_seed(seed)
    small_sqs: list[float] = []
    big_sqs: list[float] = []
    with probe(model, None, target) as (net, _):
        net.train()
        step = Step(net, loss_fn, None, device=target, precision=precision, micro_batch_size=micro_batch_size)
        if not step.params:
            raise expected("model", "a model with trainable parameters", type(model).__name__)
        dtype = param_dtype(net)
        for draw in range(num_batches):
            indices = torch.randint(len(source), (big_batch,), generator=generator)
            batch = to_device(source.gather(indices.numpy()), target, dtype)
            big = [torch.zeros_like(p) for p in step.params]
            small_sq = 0.0
            for small, size in micro_batches(batch, small_batch):
                grads = _mean_grad(step, small, size)
                small_sq += squared_grad_norm(grads)
                for acc, grad in zip(big, grads):
                    acc.add_(grad)
            count = big_batch // small_batch
            small_sqs.append(small_sq / count)
            big_sqs.append(squared_grad_norm(g / count for g in big))
            logger.debug("noise scale draw %d: |G_small|²=%.4g |G_big|²=%.4g", draw, small_sqs[-1], big_sqs[-1])
    small_mean = sum(small_sqs) / num_batches
    big_mean = sum(big_sqs) / num_batches
    grad_sq = grad_sq_estimate(small_mean, big_mean, small_batch, big_batch)
    trace_cov = trace_cov_estimate(small_mean, big_mean, small_batch, big_batch)
    b_simple = simple_noise_scale(grad_sq, trace_cov)
    if grad_sq <= 0:
        warnings.warn(
            f"The estimate of |G|² is not positive ({grad_sq:.3g}): gradient noise swamps the signal at "
            f"big_batch={big_batch}. Raise big_batch or num_batches; b_simple is reported as inf.",
            stacklevel=2,
        )
    logger.info("noise scale: B_simple=%.4g (|G|²=%.4g, tr Σ=%.4g)", b_simple, grad_sq, trace_cov)
    return NoiseScale(
        b_simple=b_simple,
        grad_sq=grad_sq,
        trace_cov=trace_cov,
        small_batch=small_batch,
        big_batch=big_batch,
        small_sq=tuple(small_sqs),
        big_sq=tuple(big_sqs),
    )
