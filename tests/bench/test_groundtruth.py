"""The ground-truth benchmark's parts: the plain loop, the critical-batch fit, the exact noise scale, the table."""

from __future__ import annotations

import math

import batchfit as bf
from benchmarks.groundtruth import fit_critical_batch, markdown
from benchmarks.groundtruth_loop import initial_state, next_check, plain_run
from benchmarks.groundtruth_tasks import exact_linear_noise_scale, linear_sgd


def test_fit_recovers_s_min_and_e_min_of_the_empirical_model():
    steps = {b: round(40 * (1 + 300 / b)) for b in (16, 32, 64, 128, 256, 512)}
    fitted = fit_critical_batch(steps)
    assert math.isclose(fitted["s_min"], 40, rel_tol=0.02)
    assert math.isclose(fitted["b_crit"], 300, rel_tol=0.03)


def test_checks_are_every_step_then_three_percent_apart():
    assert [next_check(s) for s in (1, 10, 33)] == [2, 11, 34]
    assert next_check(100) == 103 and next_check(1000) == 1030


def test_exact_noise_scale_agrees_with_batchfits_estimate():
    task = linear_sgd(samples=4096)
    model = task.make_model()
    exact = exact_linear_noise_scale(model, *task.train)
    estimate = bf.estimate_noise_scale(model, task.loss_fn, task.train, small_batch=16, big_batch=256,
                                       num_batches=40, device="cpu").b_simple
    assert math.isclose(estimate, exact, rel_tol=0.25), (estimate, exact)


def test_plain_run_reaches_the_target_deterministically_and_reports_divergence():
    task = linear_sgd(samples=2048)
    init = initial_state(task)
    first, again = (plain_run(task, init, 64, 0.32) for _ in range(2))
    assert first["steps"] is not None and first == again
    diverged = plain_run(task, init, 64, 8.0)
    assert diverged["steps"] is None and diverged["diverged"]
    short = plain_run(task, init, 64, 0.32, max_steps=first["steps"] - 1)
    assert short["steps"] is None and short["steps_run"] == first["steps"] - 1


def test_markdown_gives_each_answer_its_ratio_and_names_a_miss():
    row = {"task": "t", "best": {"batch_size": 64, "lr": 0.1, "seconds": 1.0, "steps": 10},
           "tune": {"batch_size": 64, "lr": 0.1, "ratio": 1.0, "cost_share": 0.03, "wall_share": 0.08, "runs": 12},
           "auto": {"batch_size": 128, "lr": 0.2, "ratio": None}, "adaptive": {"sizes": [64, 128], "ratio": 1.1},
           "fit": {"b_crit": 100.0}, "noise": {"b_simple_init": 50.0, "b_simple_warm": 80.0, "b_simple_mid": 200.0}}
    line = markdown([row]).splitlines()[2]
    assert "| 64, 0.1 → 1.00× | 3 % (8 %, 12 runs) | 128, 0.2 → not reached | 64→128 → 1.10× |" in line
    assert line.endswith("| 100 | 50 / 80 / 200 | 0.50 / 0.80 / 2.00 |")
