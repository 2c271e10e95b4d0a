"""``batch_size="auto"`` and ``"adaptive"``: the batch size chosen from measurements.

The choice trades the two costs of a batch size B (McCandlish et al. 2018): the samples needed
to reach a given loss grow as ``E_min (1 + B / B_noise)`` while the samples processed per
second, ``throughput(B)``, grow with B until the hardware saturates. The time to a given loss
is therefore proportional to

    cost(B) = (1 + B / B_noise) / throughput(B)

when the learning rate is the optimal one for each ``B``. The batch size is the power of two
that minimises the cost, with ``B_noise`` and ``throughput`` measured by one probe of real
forward and backward passes at the starting weights
(:func:`~batchfit.measure.probe.probe_batch_sizes`), never below ``base_batch_size`` (the
noise scale grows as the loss falls, so a low one at the starting weights says little of the
run). The learning rate is the one the trainer's ``lr_scaling`` rule gives, the sqrt rule
stopped at the noise scale (:func:`auto_lr_factor`); where it raises the lr, a short trial of
real steps checks that the loss still falls, else the rise is halved until it does. The lr the
noise scale predicts as optimal (:func:`rule_lr_ratio`) is reported, not used as a veto: the
ground-truth grids (docs/batch-size.md) found the noise scale at the starting weights up to
15× below the critical batch of a whole run, because it grows as the loss falls.

``"adaptive"`` keeps measuring the noise scale during training (from the micro-batch gradients
that accumulation computes anyway) and grows the batch as it grows, as Smith et al. 2018
("Don't decay the learning rate, increase the batch size") and Pollux's goodput (Qiao et al.,
OSDI 2021) suggest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.batch import LossFn, param_dtype, to_device
from ..core.step import Step
from ..data.sources import Source
from .lr import scale_lr
from .noise import NoiseScaleTracker
from .probe import probe_batch_sizes
from .state import probe, snapshot

logger = logging.getLogger("batchfit")


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two from the one at or above ``low`` up to ``high`` (``[high]`` if none)."""
    sizes, size = [], 1
    while size < low:
        size *= 2
    while size <= high:
        sizes.append(size)
        size *= 2
    return sizes or [high]


def round_to_power_of_two(value: float, low: int, high: int) -> int:
    """The power of two nearest ``value`` in log scale, within ``[low, high]``."""
    if not math.isfinite(value):
        return powers_of_two(low, high)[-1]
    exponent = round(math.log2(max(value, 1.0)))
    return int(min(max(2**exponent, low), high))


def measure_throughput(model: torch.nn.Module, loss_fn: Any, src: Source, sizes: list[int],
                       device: torch.device, seed: int = 0, window: float = 0.02,
                       precision: str = "fp32") -> dict[int, float]:
    """Samples per second of forward + backward at each batch size (state restored).

    The fastest pass of each size counts, over at least ``window`` seconds of passes, since
    other load on the machine only ever adds time (:func:`~batchfit.measure.probe.probe_batch_sizes`).
    """
    measured = probe_batch_sizes(model, loss_fn, src, sizes, device, window=window, stop_above_noise=None, seed=seed,
                                 precision=precision)
    return {size: measured.throughput(size) for size in measured.pass_seconds}


def batch_cost(size: int, noise_scale: float, throughput: float, lr_ratio: float = 1.0) -> float:
    """Relative time to a given loss: ``(1 + B / B_noise) / throughput(B)``; ``inf`` if the lr diverges.

    ``lr_ratio`` is the learning rate used at ``B`` over the optimal one there. In the quadratic
    model of McCandlish et al. (2018, eq. 2.6) a step of ``r`` times the optimal lr lowers the
    loss by ``r (2 − r)`` of the most a step can, so from ``r = 2`` on the loss no longer falls.
    Below that the lr is taken as the optimal one: the ratio itself is an estimate from the
    noise scale at the starting weights, which grows as training goes on and so brings the
    rule's lr closer to the optimum (a short trial guards the choice when ``r > 1``).
    """
    if lr_ratio >= 2.0:
        return math.inf
    return (1.0 + size / max(noise_scale, 1e-12)) / throughput


def rule_lr_ratio(size: int, base_batch: int | None, noise_scale: float, rule: str | None) -> float:
    """The lr a scaling rule gives at ``size`` over the optimal lr there, if the user's is optimal at ``base_batch``.

    McCandlish et al. (2018, eq. 2.7): ``ε_opt(B) = ε_max / (1 + B_noise / B)``, so
    ``ε_opt(B) / ε_opt(B₀) = (1 + B_noise / B₀) / (1 + B_noise / B)``: linear in ``B`` well
    below the noise scale, flat well above it. A rule (``"linear"``, ``"sqrt"``, or ``None`` for
    a fixed lr) that keeps scaling past the noise scale overshoots: the ratio exceeds 1, and
    beyond 2 training diverges. Without a ``base_batch`` (or for ``"adascale"``, which follows
    the measured noise) the lr is taken as optimal: 1.
    """
    if base_batch is None or rule == "adascale":
        return 1.0
    optimal = (1.0 + noise_scale / base_batch) / (1.0 + noise_scale / size)
    given = scale_lr(1.0, base_batch, size, rule) if rule is not None else 1.0
    return given / optimal


def auto_lr_factor(size: int, base_batch: int | None, noise_scale: float, rule: str | None) -> float:
    """The factor ``batch_size="auto"`` raises the lr by at ``size``: the rule's, sqrt stopped at the noise scale.

    Square-root scaling (the rule for Adam-type optimizers) grows the lr up to ``max(noise_scale,
    base_batch)`` and no further: the best Adam lr peaks near the noise scale (Malladi et al.
    2022; Li et al. 2024), and on the ground-truth MLP the rule past it gave 0.09 at batch 256
    where 0.064 was best (1.46× the time to target), while on the transformer the best lr was flat
    from batch 16 on. The linear rule is left whole: on both SGD grids the best lr grew linearly
    up to the stability limit, which :func:`choose_batch_size` finds by a short trial instead.
    """
    if rule in (None, "adascale") or base_batch is None:
        return 1.0
    if rule == "sqrt" and math.isfinite(noise_scale) and size > max(noise_scale, base_batch):
        size = max(round(noise_scale), base_batch)
    return scale_lr(1.0, base_batch, size, rule)


@dataclass(frozen=True)
class BatchChoice:
    """What :func:`choose_batch_size` decided, and its evidence.

    ``batch_size`` is the choice; ``largest`` the largest size it considered (the cap for
    adaptive growth); ``reason`` says why in words; ``throughput`` is samples per second of
    each size probed; ``probe_seconds`` what the measurement cost; ``lr_cap`` the most the
    ``lr_scaling`` rule may raise the lr (a factor over the base lrs; ``inf`` where the rule's own
    factor trained in the short trial).
    """

    batch_size: int
    largest: int
    b_simple: float
    reason: str
    throughput: dict[int, float] = field(default_factory=dict)
    probe_seconds: float = 0.0
    lr_cap: float = math.inf


def choose_batch_size(model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer,
                      src: Source, *, device: torch.device, precision: str = "fp32", seed: int = 0,
                      lr_scaling: str | None = None, base_batch_size: int | None = None,
                      base_lrs: Sequence[float] | None = None, min_batch: int = 8,
                      max_batch: int | None = None, slack: float = 0.1, warmup_steps: int = 25) -> BatchChoice:
    """Measure the noise scale and step times after a short warm-up and pick the batch size.

    ``lr_scaling`` and ``base_batch_size`` are the rule the run will scale its learning rate
    by, ``base_lrs`` the lrs (one per parameter group) it scales (the optimizer's by default).
    The measurements are taken after ``warmup_steps`` steps at ``base_batch_size`` (32 without
    one) with the base lrs, on the model itself, which is then put back: the noise scale at the
    starting weights is far from the run's (0.05× to 12× the critical batch fitted from the
    ground-truth grids), 25 steps in it was 0.35× to 0.92× on each. Model, optimizer and random
    state are left as they were.
    """
    begin = time.perf_counter()
    lrs = list(base_lrs) if base_lrs is not None else [group["lr"] for group in optimizer.param_groups]
    warm_batch = min(base_batch_size or 32, len(src))
    with probe(model, optimizer, device) as (net, opt):
        assert opt is not None
        before = snapshot(net, opt, cuda=device.type == "cuda")
        warmed = warmup_steps
        if warmup_steps and not math.isfinite(_train(net, loss_fn, opt, src, warm_batch, lrs, device, precision,
                                                     seed + 1, warmup_steps)):
            before.restore()  # your lr diverged at your batch: measure at the starting weights
            warmed = 0
        choice = _choose(net, loss_fn, opt, src, device=device, precision=precision, seed=seed,
                         lr_scaling=lr_scaling, base_batch_size=base_batch_size, lrs=lrs, min_batch=min_batch,
                         max_batch=max_batch, slack=slack)
    warm = (f"measured after {warmed} steps at batch {warm_batch} with your lr (then put back)" if warmed else
            f"measured at the starting weights (your lr diverged in {warmup_steps} warm-up steps at batch "
            f"{warm_batch})" if warmup_steps else "measured at the starting weights")
    return dataclasses.replace(choice, reason=f"{warm}: {choice.reason}", probe_seconds=time.perf_counter() - begin)


def _choose(model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer, src: Source, *,
            device: torch.device, precision: str, seed: int, lr_scaling: str | None, base_batch_size: int | None,
            lrs: list[float], min_batch: int, max_batch: int | None, slack: float) -> BatchChoice:
    """:func:`choose_batch_size` at the current weights."""
    n = len(src)
    # No cap short of the data (the ground-truth grids found the fastest batch at a fifth to a third
    # of a small data set): at least two steps an epoch unless `max_batch` says otherwise.
    cap = powers_of_two(1, min(max_batch, n) if max_batch else max(1, n // 2))[-1]
    sizes = powers_of_two(min(min_batch, cap), cap)
    if len(sizes) == 1 and sizes[0] > 1:
        sizes = [sizes[0] // 2, sizes[0]]  # the noise scale needs two sizes
    # Sizes are probed up to 16× the noise scale measured so far, not 4×: at the starting weights it
    # can be far below the critical batch of the whole run (15× on the ground truth's regression).
    measured = probe_batch_sizes(model, loss_fn, src, sizes, device, optimizer=optimizer, seed=seed,
                                 precision=precision, stop_above_noise=16.0)
    b_simple = measured.b_simple
    # An infinite (or huge) estimate means the noise swamps the signal at every size probed: the
    # noise scale is beyond them all, so only throughput matters; no estimate exceeds the data set.
    b_noise = min(max(b_simple, 1.0), float(n)) if not math.isnan(b_simple) else float(cap)
    # Whether the rule's lr diverges is judged on a cautious noise scale, so that a lucky estimate
    # never lets a large batch through; the cost uses the estimate itself.
    b_low = measured.b_simple_low
    b_cautious = min(max(b_low, 1.0), b_noise) if not math.isnan(b_low) else b_noise
    # Never below the batch the user's lr was chosen at: the noise scale grows as the loss falls, so one
    # below it at the starting weights says little of the run (4 against a critical batch of 73 on the
    # ground truth's transformer, whose best batch was the user's own).
    floor = min(base_batch_size or 1, cap)
    candidates = [size for size in measured.pass_seconds if floor <= size <= cap] or [floor]
    ratios = {size: rule_lr_ratio(size, base_batch_size, b_cautious, lr_scaling) for size in candidates}
    # The ratios predict from the noise scale at the starting weights, which the ground-truth grids
    # showed can be 15× below the critical batch of the whole run (it grows as the loss falls):
    # they are evidence, not a veto. Whether the rule's lr trains at a size is measured instead.
    costs = {size: batch_cost(size, b_noise, measured.throughput(size)) for size in ratios}
    ranked = sorted(costs, key=costs.__getitem__)
    best = ranked[0]
    rule_factor = 1.0 if lr_scaling in (None, "adascale") or base_batch_size is None else \
        scale_lr(1.0, base_batch_size, best, lr_scaling)
    factor = auto_lr_factor(best, base_batch_size, b_noise, lr_scaling)
    sqrt_capped = factor < rule_factor
    # Where the rule raises the lr, a short trial checks that it trains at least about as well as your
    # lr does at this batch over the same few batches (``slack``: 10 % worse at most); if not, the rise
    # is halved until it does. The best lr stops growing with the batch near the noise scale (McCandlish
    # et al. 2018, eq. 2.7) while larger batches still need fewer steps: on the ground truth's linear
    # regression the rule's lr diverged from batch 256 on, yet 512 at the lr of 128 was the fastest.
    unstable: list[float] = []
    if factor > 1:
        def trial(scale: float) -> float:
            return _trial_loss(model, loss_fn, optimizer, src, best, [lr * scale for lr in lrs], device, precision,
                               seed)

        yours = trial(1.0)  # your lr at this batch, on the same batches: what the rule's must not end above
        while factor > 1 and not trial(factor) <= (1 + slack) * yours:
            unstable.append(factor)
            factor = max(1.0, factor / 2)
    lr_cap = factor if unstable or sqrt_capped else math.inf
    reason = (f"noise scale B_simple={b_simple:.4g} (|G|²={measured.grad_sq:.3g}, tr Σ={measured.trace_cov:.3g}; "
              f"cautious {b_cautious:.4g}); "
              f"throughput " + ", ".join(f"{size}: {measured.throughput(size):,.0f}/s" for size in costs)
              + "; lr / optimal lr " + ", ".join(f"{size}: {ratio:.2f}" for size, ratio in ratios.items())
              + f"; cost (1+B/B_noise)/throughput is least at {ranked[0]}"
              + f"; probe {measured.seconds:.2f} s, timing spread up to "
              + f"{100 * max(measured.spread.values(), default=0.0):.0f} %")
    if not max_batch and math.isfinite(b_simple) and b_simple > cap:
        reason += (f"; the noise scale is above the cap of {cap} (at least two steps per epoch of {n} samples): "
                   f"set max_batch_size to allow larger batches")
    if floor > 1:
        reason += f"; not below base_batch_size={floor}"
    if sqrt_capped:
        reason += f"; the sqrt rule stops at the noise scale: the lr rises by × {factor:.3g}, not more"
    if unstable:
        reason += (f"; in a short trial at {best} the lr the {lr_scaling} rule gives (× {unstable[0]:.3g}) ended "
                   f"above your own lr's loss, so the lr rises by at most × {factor:.3g}")
    return BatchChoice(best, cap, b_simple, reason, {k: measured.throughput(k) for k in costs},
                       measured.seconds, lr_cap)


def _train(model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer, src: Source,
           size: int, lrs: list[float], device: torch.device, precision: str, seed: int, steps: int) -> float:
    """``steps`` real training steps at ``size`` with learning rates ``lrs``; the mean loss of the last third.

    ``inf`` as soon as a loss is not finite. The batches depend on ``seed`` only, so runs at
    different lrs see the same samples in the same order and their losses differ by the lr alone.
    """
    rng = np.random.default_rng(seed)
    losses = []
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    model.train()
    step, dtype = Step(model, loss_fn, optimizer, device=device, precision=precision), param_dtype(model)
    step.skip()
    for _ in range(steps):
        losses.append(float(step.run(to_device(src.gather(rng.integers(0, len(src), size)), device, dtype))))
        if not math.isfinite(losses[-1]):
            return math.inf
    tail = losses[-max(1, steps // 3):]
    return sum(tail) / len(tail)


def _trial_loss(model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer, src: Source,
                size: int, lrs: list[float], device: torch.device, precision: str, seed: int,
                steps: int = 12) -> float:
    """:func:`_train` from the current state, which is then put back."""
    with probe(model, optimizer, device) as (net, opt):
        assert opt is not None
        return _train(net, loss_fn, opt, src, size, lrs, device, precision, seed, steps)


@dataclass(frozen=True)
class BatchChange:
    """A batch size :class:`AdaptiveBatch` proposes, with its reason."""

    batch_size: int
    reason: str
    b_simple: float


class AdaptiveBatch:
    """Grows the batch size as the measured noise scale grows (never shrinks it).

    Every ``every`` steps, once the tracker has ``warmup`` measurements, the target is the
    power of two nearest the noise scale, within ``[current, max_batch]``; the batch changes
    when the target is at least twice the current size. The learning rate follows through the
    trainer's ``lr_scaling`` rule (``"linear"``, ``"sqrt"`` or ``"adascale"``). The policy
    proposes (:meth:`propose`); the training loop applies.
    """

    def __init__(self, start: int, max_batch: int, noise_scale: float = math.nan, every: int = 20,
                 warmup: int = 10, beta: float = 0.9) -> None:
        self.start, self.batch_size, self.max_batch = start, start, max_batch
        self.every, self.warmup = every, warmup
        self.tracker = NoiseScaleTracker(beta=beta)
        self.initial_noise_scale = noise_scale
        self.cap_reported = False

    def propose(self, step: int, noise: tuple[float, float, float, float] | None) -> BatchChange | None:
        """Fold in the measurement of the step just done (``None``: none this step); the new batch size, when due.

        ``noise`` is ``(|G_small|², |G_big|², b_small, b_big)``. The policy only proposes: the
        caller applies a change and then calls :meth:`accept`.
        """
        if noise is not None:
            self.tracker.update(*noise)
        if step % self.every or self.tracker.count < self.warmup:
            return None
        b_simple = self.tracker.b_simple
        target = round_to_power_of_two(b_simple, self.batch_size, self.max_batch)
        if target >= 2 * self.batch_size:
            return BatchChange(target, f"noise scale B_simple={b_simple:.4g} grew past {self.batch_size}", b_simple)
        if not self.cap_reported and self.batch_size >= self.max_batch and math.isfinite(b_simple) \
                and b_simple >= 2 * self.max_batch:
            self.cap_reported = True  # said once: the batch stays, the user may raise the cap
            return BatchChange(self.batch_size, f"noise scale B_simple={b_simple:.4g} is past the cap of "
                               f"{self.max_batch} (max_batch_size, or at least two steps per epoch): the batch "
                               f"stays at {self.batch_size}", b_simple)
        return None

    def accept(self, change: BatchChange) -> None:
        """Record that the batch size is now ``change.batch_size``."""
        self.batch_size = change.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Current size and the tracker's averages."""
        return {"start": self.start, "batch_size": self.batch_size, "max_batch": self.max_batch,
                "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.start, self.batch_size, self.max_batch = state["start"], state["batch_size"], state["max_batch"]
        self.tracker.load_state_dict(state["tracker"])
