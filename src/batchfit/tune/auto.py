"""``batch_size="auto"`` and ``"adaptive"``: the batch size chosen from measurements.

The choice trades the two costs of a batch size B (McCandlish et al. 2018): the samples needed
to reach a given loss grow as ``E_min (1 + B / B_noise)`` while the samples processed per
second, ``throughput(B)``, grow with B until the hardware saturates. The time to a given loss
is therefore proportional to

    cost(B) = (1 + B / B_noise) / throughput(B)

and the batch size is the power of two that minimises it, with ``B_noise`` the measured simple
noise scale of the model at its starting weights and ``throughput`` measured by real forward and
backward passes. ``"adaptive"`` keeps measuring the noise scale during training (from the
micro-batch gradients that accumulation computes anyway) and grows the batch as it grows, as
Smith et al. 2018 ("Don't decay the learning rate, increase the batch size") and Pollux's
goodput (Qiao et al., OSDI 2021) suggest.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.sources import Source
from ..train.batch import forward_loss
from .noise import NoiseScaleTracker, estimate_noise_scale
from .state import batch_to, probe

if TYPE_CHECKING:
    from ..train.trainer import Trainer

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
                       device: torch.device, repeats: int = 3, seed: int = 0,
                       window: float = 0.02) -> dict[int, float]:
    """Samples per second of forward + backward at each batch size (state restored).

    Each of ``repeats`` measurements runs steps until ``window`` seconds have passed, so tiny
    models are timed over many steps; the best measurement counts, since other load on the
    machine only ever adds time.
    """
    rng = np.random.default_rng(seed)
    rates: dict[int, float] = {}
    with probe(model, None, device) as (net, _):
        net.train()
        for size in sizes:
            batch = batch_to(src.gather(rng.integers(0, len(src), size)), device)
            best = 0.0
            for repeat in range(repeats + 1):  # the first measurement warms up allocations
                start, steps = time.perf_counter(), 0
                while True:
                    loss, _ = forward_loss(net, loss_fn, batch)
                    loss.backward()
                    net.zero_grad(set_to_none=True)
                    steps += 1
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - start
                    if elapsed >= window:
                        break
                if repeat:
                    best = max(best, steps * size / elapsed)
            rates[size] = best
    return rates


def batch_cost(size: int, noise_scale: float, throughput: float) -> float:
    """Relative time to a given loss: ``(1 + B / B_noise) / throughput(B)``."""
    return (1.0 + size / max(noise_scale, 1e-12)) / throughput


def choose_batch_size(trainer: Trainer, src: Source, min_batch: int = 8, max_batch: int | None = None) -> int:
    """Measure the noise scale and throughput at the current weights and pick the batch size.

    Logs the decision and its evidence, records it in ``trainer.history.events``, and for
    ``"adaptive"`` runs starts the continuous noise-scale tracker.
    """
    n = len(src)
    # At least 16 steps per epoch; a power of two unless the data is tiny.
    cap = powers_of_two(1, min(max_batch or n, max(1, n // 16), getattr(trainer, "max_batch_size", None) or n))[-1]
    low = min(min_batch, cap)
    # A short probe: 6 draws of 8 small batches, then throughput only within 4x of the noise scale.
    small = max(1, min(16, cap // 8))
    noise = estimate_noise_scale(trainer.module, trainer.loss_fn, src, small_batch=small, big_batch=8 * small,
                                 num_batches=6, seed=trainer.settings.seed, device=trainer.device)
    b_noise = min(max(noise.b_simple if math.isfinite(noise.b_simple) else float(cap), 1.0), float(n))
    sizes = [size for size in powers_of_two(low, cap) if b_noise / 4 <= size <= 4 * b_noise] or [
        round_to_power_of_two(b_noise, low, cap)]
    rates = measure_throughput(trainer.module, trainer.loss_fn, src, sizes, trainer.device, repeats=2, window=0.01,
                               seed=trainer.settings.seed)
    costs = {size: batch_cost(size, b_noise, rate) for size, rate in rates.items()}
    ranked = sorted(costs, key=costs.__getitem__)
    unstable = []
    for best in ranked:
        if trainer.settings.lr_scaling in (None, "adascale") or best == ranked[-1] or _stable(trainer, src, best):
            break
        unstable.append(best)
    reason = (f"noise scale B_simple={noise.b_simple:.4g} (|G|²={noise.grad_sq:.3g}, tr Σ={noise.trace_cov:.3g}); "
              f"throughput " + ", ".join(f"{s}: {r:,.0f}/s" for s, r in rates.items())
              + f"; cost (1+B/B_noise)/throughput is least at {ranked[0]}")
    if unstable:
        reason += (f"; the loss rose in a short trial at the lr the {trainer.settings.lr_scaling} rule gives for "
                   f"{', '.join(map(str, unstable))}, so {best}")
    logger.info("batch_size=%r: chose %d — %s", trainer.settings.batch_size, best, reason)
    trainer.history.add_event(step=trainer.step, kind="batch_size", batch_size=best, reason=reason,
                              b_simple=noise.b_simple, throughput={str(k): v for k, v in rates.items()})
    if trainer.settings.batch_size == "adaptive":
        trainer.adaptive = AdaptiveBatch(start=best, max_batch=cap, noise_scale=noise.b_simple)
    return best


def _stable(trainer: Trainer, src: Source, size: int, steps: int = 8) -> bool:
    """Whether a few real steps at ``size``, with the lr the scaling rule gives it, lower the loss.

    The noise scale says how large a batch can be used efficiently, not whether the lr that
    a scaling rule gives it is stable; a short trial (state restored afterwards) checks that.
    """
    from .lr import scale_lr

    s = trainer.settings
    assert s.lr_scaling is not None and s.base_batch_size is not None
    factor = scale_lr(1.0, s.base_batch_size, size, s.lr_scaling)
    rng = np.random.default_rng(s.seed)
    losses = []
    with probe(trainer.module, trainer.optimizer, trainer.device) as (net, optimizer):
        assert optimizer is not None
        for group, base in zip(optimizer.param_groups, trainer.base_lrs):
            group["lr"] = base * factor
        net.train()
        for _ in range(steps):
            batch = batch_to(src.gather(rng.integers(0, len(src), size)), trainer.device)
            loss, _ = forward_loss(net, trainer.loss_fn, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                return False
    head, tail = losses[: steps // 3], losses[-(steps // 3):]
    return sum(tail) <= sum(head)


class AdaptiveBatch:
    """Grows the batch size as the measured noise scale grows (never shrinks it).

    Every ``every`` steps, once the tracker has ``warmup`` measurements, the target is the
    power of two nearest the noise scale, within ``[current, max_batch]``; the batch changes
    when the target is at least twice the current size. The learning rate follows through the
    trainer's ``lr_scaling`` rule (``"linear"``, ``"sqrt"`` or ``"adascale"``).
    """

    def __init__(self, start: int, max_batch: int, noise_scale: float = math.nan, every: int = 20,
                 warmup: int = 10, beta: float = 0.9) -> None:
        self.start, self.batch_size, self.max_batch = start, start, max_batch
        self.every, self.warmup = every, warmup
        self.tracker = NoiseScaleTracker(beta=beta)
        self.initial_noise_scale = noise_scale

    def update(self, trainer: Trainer, pair: tuple[float, float, int, int] | None) -> None:
        """Fold in this step's measurement; change the batch size when it is due."""
        if pair is not None:
            self.tracker.update(*pair)
        if trainer.step % self.every or self.tracker.count < self.warmup:
            return
        target = round_to_power_of_two(self.tracker.b_simple, self.batch_size, self.max_batch)
        if target >= 2 * self.batch_size:
            reason = f"noise scale B_simple={self.tracker.b_simple:.4g} grew past {self.batch_size}"
            logger.info("step %d: batch_size %d -> %d (%s)", trainer.step, self.batch_size, target, reason)
            trainer.history.add_event(step=trainer.step, kind="batch_size", batch_size=target, reason=reason,
                                      b_simple=self.tracker.b_simple)
            self.batch_size = target
            assert trainer.batcher is not None
            trainer.batcher.batch_size = target

    def state_dict(self) -> dict[str, Any]:
        """Current size and the tracker's averages."""
        return {"start": self.start, "batch_size": self.batch_size, "max_batch": self.max_batch,
                "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.start, self.batch_size, self.max_batch = state["start"], state["batch_size"], state["max_batch"]
        self.tracker.load_state_dict(state["tracker"])
