"""The batch-size probe: step times and noise scale from one set of passes, state left alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.measure.probe import probe_batch_sizes


def _data(n: int = 2048, seed: int = 0) -> bf.ArraySource:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = ((x[:, 0] + 0.8 * rng.standard_normal(n)) > 0).astype(np.int64)
    return bf.ArraySource(x, y)


def test_probe_batch_sizes_leaves_model_optimizer_and_rng_bit_identical(make_mlp):
    model = make_mlp(6, 16, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Give the optimizer some state first, so that restoring it is not trivially "empty".
    F.cross_entropy(model(torch.randn(8, 6)), torch.zeros(8, dtype=torch.long)).backward()
    optimizer.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state_dict()["state"].items()}
    rng = torch.get_rng_state()

    probe_batch_sizes(model, F.cross_entropy, _data(), [8, 16, 32], torch.device("cpu"), optimizer=optimizer)

    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for param, grad in zip(model.parameters(), grads):
        assert torch.equal(param.grad, grad)
    for key, saved in state.items():
        for name, tensor in saved.items():
            assert torch.equal(optimizer.state_dict()["state"][key][name], tensor), (key, name)
    assert torch.equal(torch.get_rng_state(), rng)


def test_probe_batch_sizes_times_every_size_and_fits_the_noise(make_mlp):
    model = make_mlp(6, 16, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = [8, 16, 32, 64]
    measured = probe_batch_sizes(model, F.cross_entropy, _data(), sizes, torch.device("cpu"),
                                 optimizer=optimizer, stop_above_noise=None, min_passes=4)
    assert sorted(measured.pass_seconds) == sizes
    assert all(measured.passes[size] >= 4 for size in sizes)
    assert all(seconds > 0 for seconds in measured.pass_seconds.values())
    assert measured.update_seconds > 0
    assert math.isclose(measured.throughput(32), 32 / measured.step_seconds(32))
    assert measured.step_seconds(32) > measured.update_seconds
    assert math.isfinite(measured.trace_cov) and measured.trace_cov > 0


def test_probe_batch_sizes_stops_well_past_the_noise_scale(make_mlp):
    # Pure-noise labels: the gradient is almost all noise, so the noise scale is large; clean labels: small.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4096, 6)).astype(np.float32)
    clean = bf.ArraySource(x, (x[:, 0] > 0).astype(np.int64))
    sizes = [2**k for k in range(1, 12)]
    measured = probe_batch_sizes(make_mlp(6, 16, 2), F.cross_entropy, clean, sizes, torch.device("cpu"),
                                 stop_above_noise=4.0)
    largest = max(measured.pass_seconds)
    assert largest < sizes[-1], "the probe went on past 4x the noise scale"
    assert largest >= 4 * measured.b_simple or not math.isfinite(measured.b_simple) or largest == sizes[-1]


def test_step_seconds_follow_the_fitted_line_through_every_size():
    from batchfit.measure.probe import BatchProbe

    # Passes of 1 ms + 0.1 ms per sample, one of them slowed down by other load on the machine.
    times = {8: 0.0018, 16: 0.0026, 32: 0.0042 * 1.5, 64: 0.0074}
    measured = BatchProbe(times, update_seconds=0.0005, grad_sq=1.0, trace_cov=10.0)
    fitted = [measured.step_seconds(size) - 0.0005 for size in times]
    # The line sits between the slowed pass and the true time, and is exact where the load was not.
    assert 0.0042 < fitted[2] < 0.0042 * 1.5
    assert measured.throughput(64) > measured.throughput(32)
    # A line that falls with the batch size is no model of compute: the measured times count.
    falling = BatchProbe({8: 0.004, 16: 0.003}, update_seconds=0.0, grad_sq=1.0, trace_cov=1.0)
    assert falling.step_seconds(16) == 0.003


def test_probe_batch_sizes_runs_under_autocast_for_bf16(make_mlp):
    model = make_mlp(6, 16, 2)
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    measured = probe_batch_sizes(model, F.cross_entropy, _data(), [8, 16, 32], torch.device("cpu"),
                                 stop_above_noise=None, precision="bf16")
    assert seen and all(dtype == torch.bfloat16 for dtype in seen), "the forward pass ran outside autocast"
    assert math.isfinite(measured.trace_cov) and measured.trace_cov > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_probe_batch_sizes_fp16_unscales_to_the_fp32_measurement(make_mlp):
    model = make_mlp(6, 16, 2)
    args = (model, F.cross_entropy, _data(), [8, 16, 32], torch.device("cpu"))
    half = probe_batch_sizes(*args, stop_above_noise=None, precision="fp16")
    full = probe_batch_sizes(*args, stop_above_noise=None)
    # Same draws (same seed): the loss scale is undone, so only fp16 rounding is left.
    assert half.trace_cov == pytest.approx(full.trace_cov, rel=0.02)
    assert half.grad_sq == pytest.approx(full.grad_sq, rel=0.02, abs=1e-3 * full.trace_cov)


def test_step_seconds_ignore_a_line_with_a_negative_fixed_cost():
    from batchfit.measure.probe import BatchProbe

    # Superlinear times give a line below zero at small sizes: no model of compute, so not used.
    measured = BatchProbe({8: 0.001, 16: 0.002, 32: 0.006, 64: 0.02}, update_seconds=0.0, grad_sq=1.0, trace_cov=1.0)
    assert measured.step_seconds(8) == 0.001
