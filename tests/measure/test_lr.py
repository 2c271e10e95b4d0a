"""Learning-rate rules: scaling with the batch size, warm-up, AdaScale's gain."""

from __future__ import annotations

import math

import pytest
import torch

from batchfit.errors import BatchfitError
from batchfit.measure.lr import adascale_gain, scale_lr, warmup


def test_scale_lr_linear_multiplies_by_batch_ratio():
    assert scale_lr(0.1, 256, 1024) == pytest.approx(0.4)
    assert scale_lr(0.1, 1024, 256, rule="linear") == pytest.approx(0.025)


def test_scale_lr_sqrt_multiplies_by_root_of_batch_ratio():
    assert scale_lr(1e-3, 64, 256, rule="sqrt") == pytest.approx(2e-3)
    assert scale_lr(1e-3, 256, 64, rule="sqrt") == pytest.approx(5e-4)


def test_scale_lr_same_batch_keeps_lr():
    assert scale_lr(0.3, 32, 32) == 0.3
    assert scale_lr(0.3, 32, 32, rule="sqrt") == 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"`lr` must be a positive finite number. Received: lr=0.0"),
        ({"lr": -1.0}, r"`lr` must be .* Received: lr=-1.0"),
        ({"lr": math.nan}, r"`lr` must be .* Received: lr=nan"),
        ({"lr": "0.1"}, r"`lr` must be .* Received: lr='0.1'"),
        ({"from_batch": 0}, r"`from_batch` must be a positive integer. Received: from_batch=0"),
        ({"to_batch": 2.5}, r"`to_batch` must be a positive integer. Received: to_batch=2.5"),
        ({"to_batch": True}, r"`to_batch` must be a positive integer. Received: to_batch=True"),
        ({"rule": "square"}, r"`rule` must be one of 'linear', 'sqrt'. Received: rule='square'"),
    ],
)
def test_scale_lr_bad_input_names_argument(kwargs, match):
    args = {"lr": 0.1, "from_batch": 32, "to_batch": 64, "rule": "linear"} | kwargs
    with pytest.raises(BatchfitError, match=match):
        scale_lr(**args)


def test_scale_lr_bad_input_is_value_error():
    with pytest.raises(ValueError, match="from_batch"):
        scale_lr(0.1, -3, 8)


def test_warmup_rises_linearly_to_one():
    multipliers = [warmup(step, 4) for step in range(6)]
    assert multipliers == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_warmup_zero_steps_is_no_warmup():
    assert warmup(0, 0) == 1.0
    assert warmup(10, 0) == 1.0


def test_warmup_start_is_goyal_small_batch_lr():
    # Goyal et al.: after scaling by k=4, start from lr/4 and rise in equal steps.
    multipliers = [warmup(step, 3, start=0.25) for step in range(4)]
    assert multipliers == pytest.approx([0.5, 0.75, 1.0, 1.0])


def test_warmup_works_as_lambda_lr_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup(step, 4))
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": -1}, r"`step` must be a non-negative integer. Received: step=-1"),
        ({"warmup_steps": -5}, r"`warmup_steps` must be a non-negative integer. Received: warmup_steps=-5"),
        ({"start": 1.5}, r"`start` must be a number in \[0, 1\]. Received: start=1.5"),
    ],
)
def test_warmup_bad_input_names_argument(kwargs, match):
    with pytest.raises(BatchfitError, match=match):
        warmup(**({"step": 0, "warmup_steps": 10} | kwargs))


def test_adascale_gain_formula():
    # r = (σ² + μ²) / (σ²/S + μ²) with σ² = 3, μ² = 1, S = 4: 4 / 1.75
    assert adascale_gain(1.0, 3.0, 4) == pytest.approx(4 / 1.75)
    # base_batch divides the per-sample trace: σ² = 12 / 4 = 3
    assert adascale_gain(1.0, 12.0, 4, base_batch=4) == pytest.approx(4 / 1.75)


def test_adascale_gain_limits_are_one_and_scale():
    assert adascale_gain(1.0, 0.0, 8) == 1.0  # no noise: a bigger batch is worth one step
    assert adascale_gain(1e-12, 1e6, 8) == pytest.approx(8.0)  # all noise: worth S steps
    assert adascale_gain(0.0, 1.0, 8) == 8.0
    assert adascale_gain(0.0, 0.0, 8) == 1.0


@pytest.mark.parametrize("grad_sq", [-1.0, 0.0, 1e-9, 0.5, 1.0, 1e9, math.inf])
@pytest.mark.parametrize("trace_cov", [-2.0, 0.0, 1e-9, 1.0, 1e3, 1e12, math.inf])
@pytest.mark.parametrize("scale", [1, 1.5, 4, 1024])
def test_adascale_gain_within_one_and_scale(grad_sq, trace_cov, scale):
    gain = adascale_gain(grad_sq, trace_cov, scale)
    assert 1.0 <= gain <= scale


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.0, 1.0, 0.5), r"`scale` must be a number >= 1 .* Received: scale=0.5"),
        ((1.0, 1.0, 0), r"`scale` must be a positive finite number. Received: scale=0"),
        ((math.nan, 1.0, 2), r"`grad_sq` must be a number. Received: grad_sq=nan"),
        ((1.0, "x", 2), r"`trace_cov` must be a number. Received: trace_cov='x'"),
    ],
)
def test_adascale_gain_bad_input_names_argument(args, match):
    with pytest.raises(BatchfitError, match=match):
        adascale_gain(*args)
