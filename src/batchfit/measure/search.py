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
    reorder: int = 0  # 0: the search's data order; 1, 2: a candidate confirmed on other orders

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
                   step_seconds: Callable[[int], float], budget_seconds: float, noise_scale: float = math.nan,
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
    budget of ``budget_seconds`` (in steps × step time, like every time here) while nothing has
    reached the target — a budget of time, not of samples or epochs, which would give large
    batches too few steps to ever win; when nothing reaches the target at the start size, the
    budget doubles (at most ``max_budget_doublings`` times).
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
    walk = _Walk(sizes, start_lr, step_seconds, budget_seconds, max_lr_moves)
    k = start_k
    for _ in range(max_budget_doublings + 1):
        k = yield from walk.lr_walk(start_batch, k)
        if walk.best is not None and walk.best.reached:
            break
        walk.budget *= 2  # nothing reached the target: a longer budget, from the best lr found
        walk.results = {key: r for key, r in walk.results.items() if r.reached}
    if walk.best is None or not walk.best.reached:
        return walk.best
    for direction in (1, -1):
        before = walk.best
        yield from walk.batch_walk(start_batch, k, direction, noise_scale, patience)
        if walk.best is not before:
            break  # the best moved this way: the valley's floor is on this side
    yield from walk.run(user_batch, 0)
    return walk.best


class _Walk:
    """The state of :func:`lattice_search`: every result by (batch size, lattice exponent), and the best."""

    def __init__(self, sizes: list[int], start_lr: float, step_seconds: Callable[[int], float], budget: float,
                 max_lr_moves: int) -> None:
        self.sizes, self.start_lr, self.step_seconds = sizes, start_lr, step_seconds
        self.budget, self.max_lr_moves = budget, max_lr_moves
        self.results: dict[tuple[int, int], TrialResult] = {}
        self.best: TrialResult | None = None

    def limit(self, size: int) -> int:
        """A trial's steps: the best time so far, else the budget, at this size's step time."""
        best = self.best
        seconds = self.budget if best is None or best.steps is None else best.steps * self.step_seconds(best.batch_size)
        return max(1, math.ceil(seconds / self.step_seconds(size)))

    def run(self, size: int, k: int) -> Generator[Trial, TrialResult, TrialResult]:
        """The result at (size, k), asked for unless already known; every time and the best refreshed."""
        if (size, k) not in self.results:
            self.results[(size, k)] = yield Trial(size, self.start_lr * 2.0**k, self.limit(size))
            for result in self.results.values():  # the step times may have been refined by the run
                if result.steps is not None:
                    result.seconds = result.steps * self.step_seconds(result.batch_size)
            self.best = None
            for result in self.results.values():
                if better(result, self.best):
                    self.best = result
        return self.results[(size, k)]

    def lr_walk(self, size: int, k: int) -> Generator[Trial, TrialResult, int]:
        """The lattice exponent of the best lr at ``size``, walking from ``k`` (up while it improves, else down)."""
        best_k = k
        yield from self.run(size, k)
        for direction in (1, -1):
            j = best_k + direction
            while abs(j - k) <= self.max_lr_moves:
                result = yield from self.run(size, j)
                if not better(result, self.results[(size, best_k)]):
                    break
                best_k, j = j, j + direction
            if best_k != k:
                break  # it improved going up: the valley's floor is above the start
        return best_k

    def batch_walk(self, start: int, k: int, direction: int, noise_scale: float,
                   patience: float) -> Generator[Trial, TrialResult, None]:
        """From ``start`` one size at a time in ``direction`` while a size comes within ``patience`` of the best."""
        index, j = self.sizes.index(start) + direction, k
        while 0 <= index < len(self.sizes):
            size = self.sizes[index]
            larger = size if direction > 0 else self.sizes[index + 1]
            below = not (larger > noise_scale)  # nan: below
            j = yield from self.lr_walk(size, j + (direction if below else 0))
            result, best = self.results[(size, j)], self.best
            if result.seconds is None or best is None or best.seconds is None \
                    or result.seconds > patience * best.seconds:
                return
            index += direction
