"""The search behind ``tune()``: batch size × learning rate, raced on time to a target loss.

The ground truth it replaces is a grid: every batch size B with every lr on a ×2 lattice, each
trained until the target, the winner the least *time* to target (steps × seconds per step at
B). Measured grids (docs/batch-size.md) share three shapes that make most of the grid useless:

- at a fixed B, steps to target against log lr is one valley (too small crawls, too large
  stalls or diverges), so a walk along the lr lattice from a good start finds its floor in
  three or four runs;
- the best lr grows with B, about linearly below the critical batch and flatter above it, so
  the best lr at B is a good start at 2B (one lattice step up below the noise scale, none above);
- time to target against B at each B's best lr is one valley too: steps fall as ``1 + B_crit/B``
  (McCandlish et al. 2018) while a step's time grows with B.

And no run needs to go on once it has used the best time found so far: it can no longer win.
So the search is a coordinate walk on the (B, lr) lattice where every trial has a deadline,
the best time so far. :func:`lattice_search` is the policy only: a generator that yields
:class:`Trial` s and is sent back :class:`TrialResult` s; ``tune()`` runs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass


@dataclass(frozen=True)
class Trial:
    """One run to ask for: train at ``batch_size`` with ``lr`` for at most ``max_steps`` steps."""

    batch_size: int
    lr: float
    max_steps: int


@dataclass
class TrialResult:
    """What a trial did: ``steps`` to the target (``None``: not reached), steps run and the loss it ended on."""

    batch_size: int
    lr: float
    steps: int | None
    steps_run: int
    final_loss: float
    seconds: float | None = None  # steps × seconds per step at the batch size: the time to target
    wall_seconds: float = 0.0  # what the run took here, checks included
    stopped: str = ""  # "target", "deadline", "budget" or "diverged"
    reorder: int = 0  # 0: the search's data order; 1: the confirmation of a candidate on another order

    @property
    def reached(self) -> bool:
        return self.steps is not None


def better(a: TrialResult | None, b: TrialResult | None) -> bool:
    """Whether ``a`` beats ``b``: reached in less time, or neither reached and ``a`` ended lower."""
    if a is None:
        return False
    if b is None:
        return True
    if a.seconds is not None or b.seconds is not None:
        return b.seconds is None or (a.seconds is not None and a.seconds < b.seconds)
    return a.final_loss < b.final_loss  # nan compares false: a diverged run never wins


SearchPolicy = Generator[Trial, TrialResult, TrialResult | None]


def lattice_search(batch_sizes: list[int], start_batch: int, start_lr: float,
                   step_seconds: Callable[[int], float], budget_samples: int, noise_scale: float = math.nan,
                   patience: float = 1.15, max_budget_doublings: int = 3, max_lr_moves: int = 8,
                   start_k: int = 0, user_batch: int | None = None) -> SearchPolicy:
    """Walk the lattice ``batch_sizes`` × ``start_lr · 2^k`` towards the least time to target.

    First the lr walk at ``start_batch`` from ``start_lr · 2^start_k`` (up while it improves,
    else down); then the batch
    size walks up one size at a time, each size's lr walk starting from the best lr of the one
    before, one lattice step higher while the size is below ``noise_scale`` (linear scaling)
    and the same above it; the walk goes on while a size comes within ``patience`` of the best
    time (one valley, measured with noise); if going up found nothing better, it walks down.
    Every trial's ``max_steps`` is the best time so far over the step time at its size, or the
    budget of ``budget_samples`` samples while nothing has reached the target; when nothing
    reaches it at the start size, the budget doubles (at most ``max_budget_doublings`` times).
    An lr walk goes at most ``max_lr_moves`` lattice steps from where it started. The user's
    setting, ``(user_batch, start_lr)`` (``user_batch`` defaults to ``start_batch``), is always
    run (last, raced, if the walk passed it by), so the answer is never worse than it. Times
    are steps × ``step_seconds``, recomputed as it learns (the caller may refine it from the
    runs). The generator returns the best result.
    """
    sizes = sorted(set(batch_sizes))
    user_batch = start_batch if user_batch is None else user_batch
    for name, size in (("start_batch", start_batch), ("user_batch", user_batch)):
        if size not in sizes:
            raise ValueError(f"{name}={size} is not among batch_sizes={sizes}")
    results: dict[tuple[int, int], TrialResult] = {}
    best: TrialResult | None = None
    budget = budget_samples

    def limit(size: int) -> int:
        if best is not None and best.steps is not None:
            return max(1, math.ceil(best.steps * step_seconds(best.batch_size) / step_seconds(size)))
        return max(1, math.ceil(budget / size))

    def run(size: int, k: int) -> Generator[Trial, TrialResult, TrialResult]:
        nonlocal best
        if (size, k) not in results:
            results[(size, k)] = yield Trial(size, start_lr * 2.0**k, limit(size))
            for result in results.values():  # the step times may have been refined by the run
                if result.steps is not None:
                    result.seconds = result.steps * step_seconds(result.batch_size)
            best = None
            for result in results.values():
                if better(result, best):
                    best = result
        return results[(size, k)]

    def lr_walk(size: int, k: int) -> Generator[Trial, TrialResult, int]:
        """The lattice exponent of the best lr at ``size``, walking from ``k``."""
        best_k = k
        yield from run(size, k)
        for direction in (1, -1):
            j = best_k + direction
            while abs(j - k) <= max_lr_moves:
                result = yield from run(size, j)
                if not better(result, results[(size, best_k)]):
                    break
                best_k, j = j, j + direction
            if best_k != k:
                break  # it improved going up: the valley's floor is above the start
        return best_k

    start = sizes.index(start_batch)
    k = start_k
    for _ in range(max_budget_doublings + 1):
        k = yield from lr_walk(start_batch, k)
        if best is not None and best.reached:
            break
        budget *= 2  # nothing reached the target: a longer budget, from the best lr found
        results = {key: r for key, r in results.items() if r.reached}
    if best is None or not best.reached:
        return best
    for direction in (1, -1):
        j, before = k, best
        index = start + direction
        while 0 <= index < len(sizes):
            size = sizes[index]
            grows = direction > 0 and not (size > noise_scale)  # nan: below
            shrinks = direction < 0 and not (sizes[index + 1] > noise_scale)
            j = yield from lr_walk(size, j + (1 if grows else -1 if shrinks else 0))
            result = results[(size, j)]
            if not result.reached or best.seconds is None or result.seconds is None \
                    or result.seconds > patience * best.seconds:
                break
            index += direction
        if best is not before:
            break  # the best moved this way: the valley's floor is on this side
    yield from run(user_batch, 0)
    return best
