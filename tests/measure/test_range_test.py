"""The learning-rate range test: suggestion, early stop on divergence, restored state, plot."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from batchfit.errors import BatchfitError
from batchfit.measure.range_test import (
    LRRangeResult,
    exponential_lrs,
    lr_range_test,
    smooth,
    steepest_descent_lr,
)


def regression(n: int = 1000, features: int = 5):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    y = x @ torch.randn(features, 1, generator=generator)
    return x, y


def classification(n: int = 2000, features: int = 10, classes: int = 3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, classes, generator=generator)
    y = torch.argmax(2 * x @ w + 0.5 * torch.randn(n, classes, generator=generator), dim=1)
    return x, y


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def test_lr_range_test_suggests_lr_in_descent_region_for_sgd_regression():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = lr_range_test(
        model, torch.nn.functional.mse_loss, optimizer, regression(), min_lr=1e-4, max_lr=100, batch_size=32
    )
    # Least squares on unit-variance features: SGD diverges near lr ~ 1, learns little below 1e-3.
    assert 1e-2 <= result.suggested_lr <= 1.0
    assert result.diverged


@pytest.mark.parametrize(("make_optimizer", "low", "high"), [
    (lambda params: torch.optim.SGD(params, lr=0.1), 0.05, 5.0),
    (lambda params: torch.optim.Adam(params), 1e-3, 0.3),
])
def test_lr_range_test_suggests_lr_in_range_for_classifier(make_optimizer, low, high):
    model = mlp()
    result = lr_range_test(
        model, torch.nn.functional.cross_entropy, make_optimizer(model.parameters()), classification(),
        min_lr=1e-5, max_lr=100, batch_size=32,
    )
    assert low <= result.suggested_lr <= high
    # The suggestion lies where the smoothed loss was still falling, below the lr of the lowest loss.
    assert result.suggested_lr < result.lrs[int(np.argmin(result.losses))]


def test_lr_range_test_stops_early_on_divergence():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = lr_range_test(
        model, torch.nn.functional.mse_loss, optimizer, regression(), min_lr=1e-3, max_lr=1e4, num_steps=100
    )
    assert result.diverged
    assert len(result.lrs) < 100
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses)
    last = result.losses[-1]
    assert not math.isfinite(last) or last > 4 * min(result.losses)


def test_lr_range_test_runs_all_steps_without_divergence():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = lr_range_test(
        model, torch.nn.functional.mse_loss, optimizer, regression(), min_lr=1e-4, max_lr=0.1, num_steps=40
    )
    assert not result.diverged
    assert len(result.lrs) == 40
    assert result.lrs[0] == pytest.approx(1e-4)
    assert result.lrs[-1] == pytest.approx(0.1)


def test_lr_range_test_restores_model_and_adam_state_bit_exactly():
    model = mlp()
    x, y = classification()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for start in (0, 32):  # Adam with state: moments and step counts
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32]).backward()
        optimizer.step()
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    lr_range_test(model, torch.nn.functional.cross_entropy, optimizer, (x, y), num_steps=30, max_lr=1e3)

    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]  # lr back to 3e-3
    for index, saved in state["state"].items():
        assert saved.keys() == after["state"][index].keys()
        assert all(torch.equal(saved[k], after["state"][index][k]) for k in saved)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    # The optimizer still trains the model's own parameters afterwards.
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())


def test_lr_range_test_fresh_optimizer_stays_fresh():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    lr_range_test(model, torch.nn.functional.cross_entropy, optimizer, classification(), num_steps=10)
    assert len(optimizer.state) == 0


@pytest.mark.filterwarnings("ignore:The loss did not fall")
def test_lr_range_test_keeps_param_group_ratios():
    model = mlp()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}]
    )
    seen = []
    original_step = optimizer.step

    def spy_step(*args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return original_step(*args, **kwargs)

    optimizer.step = spy_step
    lr_range_test(model, torch.nn.functional.cross_entropy, optimizer, classification(), num_steps=5, max_lr=1e-3)
    del optimizer.step
    assert all(second == pytest.approx(first / 10) for first, second in seen)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]


def test_lr_range_test_plot_writes_png(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = lr_range_test(model, torch.nn.functional.mse_loss, optimizer, regression(), num_steps=40, max_lr=100)
    path = result.plot(tmp_path / "lr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_lr_range_test_flat_loss_falls_back_with_warning():
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 5)
    with pytest.warns(UserWarning, match="did not fall"):
        result = lr_range_test(
            model, lambda out, y: (out * 0).sum() + 1.0, optimizer, (x, x[:, :1]), num_steps=10
        )
    assert result.suggested_lr == pytest.approx(result.lrs[int(np.argmin(result.losses))] / 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_lr": 0}, r"`min_lr` must be a positive finite number. Received: min_lr=0"),
        ({"max_lr": 1e-8}, r"`max_lr` must be larger than min_lr=1e-07. Received: max_lr=1e-08"),
        ({"num_steps": 0}, r"`num_steps` must be a positive integer. Received: num_steps=0"),
        ({"batch_size": 2.0}, r"`batch_size` must be a positive integer. Received: batch_size=2.0"),
        ({"smoothing": 0}, r"`smoothing` must be a number in \(0, 1\]. Received: smoothing=0"),
        ({"diverge_factor": 1}, r"`diverge_factor` must be a number larger than 1. Received: diverge_factor=1"),
        ({"optimizer": "adam"}, r"`optimizer` must be a torch.optim.Optimizer. Received: optimizer='str'"),
    ],
)
def test_lr_range_test_bad_input_names_argument(kwargs, match):
    model = torch.nn.Linear(5, 1)
    args = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)} | kwargs
    with pytest.raises(BatchfitError, match=match):
        lr_range_test(model, torch.nn.functional.mse_loss, src=regression(), **args)


def test_lr_range_test_nan_at_min_lr_raises():
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(BatchfitError, match="not finite even at min_lr"):
        lr_range_test(model, lambda out, y: out.sum() * math.nan, optimizer, regression(), num_steps=5)


def test_exponential_lrs_are_log_spaced():
    lrs = exponential_lrs(1e-4, 1.0, 5)
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert np.allclose(np.diff(np.log(lrs)), math.log(10))


def test_smooth_is_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.1) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 3 + 0.25) / 0.75])


def test_steepest_descent_lr_picks_fastest_fall_before_minimum():
    lrs = exponential_lrs(1e-3, 1e3, 7)
    losses = [1.0, 0.99, 0.9, 0.5, 0.4, 0.3, 5.0]
    assert steepest_descent_lr(lrs, losses) == pytest.approx(1.0)  # 0.9 -> 0.5 is the steepest fall
    assert steepest_descent_lr(lrs, [1.0, 0.5, 2.0]) is None  # too few points before the minimum
    assert steepest_descent_lr(lrs, losses, skip_start=5) is None


def test_lr_range_result_is_frozen():
    result = LRRangeResult((1.0,), (1.0,), (1.0,), 0.1, False)
    with pytest.raises(AttributeError):
        result.suggested_lr = 2.0


def test_suggested_lr_trains_the_digits_mlp_and_is_capped_below_the_blow_up():
    datasets = pytest.importorskip("sklearn.datasets")
    import batchfit as bf

    digits = datasets.load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = lr_range_test(model, torch.nn.functional.cross_entropy, optimizer, (x, y), min_lr=1e-4, max_lr=100)
    lowest = result.lrs[int(np.argmin(result.losses))]
    assert result.suggested_lr <= lowest / 10 * (1 + 1e-12)
    for group in optimizer.param_groups:
        group["lr"] = result.suggested_lr
    trainer = bf.Trainer(model, torch.nn.functional.cross_entropy, optimizer, batch_size=64, progress=False)
    trainer.fit((x, y), epochs=3)
    history = trainer.history
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]  # it learns (a diverging lr ends near 0.1)
    assert trainer.evaluate((x, y))["accuracy"] > 0.6


def test_range_plot_shows_every_raw_loss_up_to_the_minimum(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    lrs = tuple(10.0 ** (k / 4) for k in range(-12, 0))
    raw = (2.0, 2.6, 1.9, 1.8, 2.2, 1.2, 1.0, 1.4, 0.9, 3.0, 8.0, 20.0)
    smoothed = tuple(smooth(raw, 0.3))
    result = LRRangeResult(lrs, smoothed, raw, 0.01, True)
    created = []
    real_subplots = matplotlib.figure.Figure.subplots

    def capture(self, *args, **kwargs):
        axes = real_subplots(self, *args, **kwargs)
        created.append(axes)
        return axes

    matplotlib.figure.Figure.subplots = capture
    try:
        result.plot(tmp_path / "range.png")
    finally:
        matplotlib.figure.Figure.subplots = real_subplots
    low, high = created[0][0][0].get_ylim()
    end = int(np.argmin(smoothed)) + 1
    assert low <= min(raw[:end]) and high >= max(raw[:end])
    pyplot.close("all")
