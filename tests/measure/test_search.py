"""The batch × lr search of tune(): on landscapes with a known optimum it finds it, raced and cheaply."""

from __future__ import annotations

import itertools
import math

import pytest

from batchfit.measure.search import TrialResult, better, lattice_search

SIZES = [8, 16, 32, 64, 128, 256, 512, 1024]


def landscape(b_noise: float, lr_max: float, s_min: float = 50.0, fixed: float = 1e-3, per_sample: float = 4e-6):
    """Steps to target of the quadratic model of McCandlish et al. (2018) and a linear step time.

    At batch B the best lr is ``lr_max / (1 + b_noise / B)`` (their eq. 2.7); at that lr the steps
    are ``s_min (1 + b_noise / B)``; an lr ``r`` times the best takes ``1 / (r (2 − r))`` as many
    (eq. 2.6: a step of r times the optimum gains r(2 − r) of the most a step can), and none
    reach the target from r = 2 on.
    """
    def steps(size: int, lr: float) -> float | None:
        ratio = lr / (lr_max / (1 + b_noise / size))
        if ratio >= 2:
            return None
        return s_min * (1 + b_noise / size) / (ratio * (2 - ratio))

    def seconds(size: int) -> float:
        return fixed + per_sample * size

    return steps, seconds


def drive(policy, steps, seconds):
    """Run the policy against the landscape; return (best, trials, samples spent)."""
    trials, spent = [], 0.0
    trial = next(policy)
    try:
        while True:
            needed = steps(trial.batch_size, trial.lr)
            reached = needed is not None and math.ceil(needed) <= trial.max_steps
            run = math.ceil(needed) if reached else trial.max_steps
            spent += run * seconds(trial.batch_size)
            trials.append(trial)
            result = TrialResult(trial.batch_size, trial.lr, run if reached else None, run,
                                 1.0 if reached else math.nan if needed is None else 1.0 + needed / 1e6,
                                 run * seconds(trial.batch_size) if reached else None,
                                 stopped="target" if reached else "deadline")
            trial = policy.send(result)
    except StopIteration as stop:
        return stop.value, trials, spent


def lattice_optimum(steps, seconds, start_lr):
    best = None
    for size, k in itertools.product(SIZES, range(-12, 13)):
        needed = steps(size, start_lr * 2.0**k)
        if needed is not None:
            time = math.ceil(needed) * seconds(size)
            best = min(best or (math.inf,), (time, size, start_lr * 2.0**k))
    return best


@pytest.mark.parametrize("b_noise", [20.0, 150.0, 900.0])
@pytest.mark.parametrize("start_lr", [1e-3, 0.05])
def test_search_finds_the_lattice_optimum_of_the_quadratic_model(b_noise, start_lr):
    steps, seconds = landscape(b_noise, lr_max=0.4)
    optimum = lattice_optimum(steps, seconds, start_lr)
    best, trials, spent = drive(lattice_search(SIZES, 32, start_lr, seconds, 10**7, noise_scale=b_noise),
                                steps, seconds)
    assert best is not None and best.seconds is not None
    assert best.seconds <= 1.05 * optimum[0], (best, optimum)
    # Raced: far fewer runs than the lattice, and every run stopped by the best time so far.
    assert len(trials) <= 24


def test_search_spends_a_fraction_of_the_grid():
    steps, seconds = landscape(150.0, lr_max=0.4)
    budget = 300 * seconds(32)  # what 300 steps at batch 32 take; a grid run stops there too
    grid = 0.0
    for size, k in itertools.product(SIZES, range(-4, 5)):
        needed = steps(size, 0.01 * 2.0**k)
        grid += min(budget, math.ceil(needed) * seconds(size)) if needed is not None else budget
    _, _, spent = drive(lattice_search(SIZES, 32, 0.01, seconds, budget), steps, seconds)
    assert spent < 0.25 * grid


def test_search_doubles_the_budget_when_nothing_reaches_the_target():
    steps, seconds = landscape(100.0, lr_max=0.4, s_min=400.0)
    best, trials, _ = drive(lattice_search(SIZES, 32, 0.1, seconds, budget_seconds=300 * 1.128e-3), steps, seconds)
    assert best is not None and best.reached
    assert max(t.max_steps for t in trials if t.batch_size == 32) >= 2 * 300  # the budget doubled


def test_search_returns_an_unreached_best_when_no_budget_suffices():
    steps, seconds = landscape(100.0, lr_max=0.4, s_min=10**6)
    best, _, _ = drive(lattice_search(SIZES, 32, 0.1, seconds, budget_seconds=10 * 1.128e-3), steps, seconds)
    assert best is not None and not best.reached


def test_search_refuses_a_start_batch_outside_the_sizes():
    with pytest.raises(ValueError, match="start_batch=48"):
        next(lattice_search(SIZES, 48, 0.1, lambda b: 1.0, 1000))


def test_better_prefers_reached_then_faster_then_lower_loss():
    fast = TrialResult(32, 0.1, 10, 10, 0.1, 1.0)
    slow = TrialResult(32, 0.1, 20, 20, 0.1, 2.0)
    missed_low = TrialResult(32, 0.1, None, 30, 0.5)
    missed_high = TrialResult(32, 0.1, None, 30, 0.9)
    diverged = TrialResult(32, 0.1, None, 3, math.nan)
    assert better(fast, slow) and not better(slow, fast)
    assert better(slow, missed_low) and not better(missed_low, slow)
    assert better(missed_low, missed_high) and not better(diverged, missed_high)
    assert better(diverged, None) and not better(None, diverged)
