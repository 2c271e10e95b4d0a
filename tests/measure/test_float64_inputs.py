"""float64 NumPy inputs (NumPy's default dtype) meet a float32 model as float32, everywhere.

The trainer's fit casts floating inputs to the weights' dtype; every probe and measurement
(auto batch size, auto micro-batch size, lr range test, noise scale, memory fit, tune) must
do the same, and none of them may turn the model into float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf


@pytest.fixture
def data64() -> tuple[np.ndarray, np.ndarray]:
    """256 samples of 6 float64 features (as NumPy makes them) and int64 labels in 3 classes."""
    x = np.random.default_rng(0).standard_normal((256, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    assert x.dtype == np.float64 and set(np.unique(y)) == {0, 1, 2}
    return x, y


@pytest.fixture
def model(make_mlp) -> torch.nn.Module:
    return make_mlp(6, 16, 3)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_float32(model: torch.nn.Module) -> None:
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.float32}, f"parameters are no longer float32: {dtypes}"


def assert_changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "fit left the weights unchanged"


def test_trainer_fit_float64_same_weights_as_float32_inputs(data64, make_mlp, assert_close):
    x64, y = data64
    runs = []
    for x in (x64, x64.astype(np.float32)):
        model = make_mlp(6, 16, 3)
        trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                             batch_size=32, progress=False)
        history = trainer.fit((x, y), epochs=1)
        assert all(math.isfinite(loss) for loss in history.losses())
        assert_float32(model)
        runs.append(weights(model))
    # The cast to float32 happens before the forward pass, so the float64 run is the float32 run.
    assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_trainer_fit_auto_batch_size_float64(data64, model):
    x64, y = data64
    before = weights(model)
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         batch_size="auto", progress=False)
    history = trainer.fit((x64, y), epochs=1)
    chosen = trainer.batcher.batch_size
    assert isinstance(chosen, int) and 1 <= chosen <= len(x64)
    assert history.steps and all(math.isfinite(s["loss"]) for s in history.steps)
    assert_float32(model)
    assert_changed(before, model)


def test_trainer_fit_auto_micro_batch_size_float64(data64, model):
    x64, y = data64
    before = weights(model)
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         batch_size=32, micro_batch_size="auto", progress=False)
    history = trainer.fit((x64, y), epochs=1)
    micro = trainer.resolved_micro_batch_size
    assert micro is None or (isinstance(micro, int) and 1 <= micro < 32), micro
    assert len(history.steps) == 256 // 32
    assert all(math.isfinite(s["loss"]) for s in history.steps)
    assert_float32(model)
    assert_changed(before, model)


def test_lr_range_test_float64(data64, model, assert_close):
    x64, y = data64
    before = weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = bf.lr_range_test(model, F.cross_entropy, optimizer, (x64, y), num_steps=10, batch_size=16)
    assert len(result.lrs) >= 1 and math.isfinite(result.losses[0])
    assert isinstance(result.suggested_lr, float) and math.isfinite(result.suggested_lr)
    assert result.suggested_lr > 0
    assert_float32(model)
    assert_close(weights(model), before, rtol=0, atol=0)  # a probe leaves no trace


def test_estimate_noise_scale_float64(data64, model, assert_close):
    x64, y = data64
    before = weights(model)
    noise = bf.estimate_noise_scale(model, F.cross_entropy, (x64, y), small_batch=8, big_batch=32,
                                    num_batches=2)
    assert isinstance(noise.b_simple, float)
    assert not math.isnan(noise.b_simple) and noise.b_simple >= 0  # finite, or inf when noise swamps the signal
    assert math.isfinite(noise.grad_sq) and math.isfinite(noise.trace_cov)
    assert_float32(model)
    assert_close(weights(model), before, rtol=0, atol=0)


def test_find_micro_batch_size_float64(data64, model, assert_close):
    x64, y = data64
    before = weights(model)
    size = bf.find_micro_batch_size(model, F.cross_entropy, (x64, y), memory_budget=2**30)
    assert isinstance(size, int) and 1 <= size <= len(x64)
    assert_float32(model)
    assert_close(weights(model), before, rtol=0, atol=0)


def test_tune_float64(data64, make_mlp):
    x64, y = data64
    built: list[torch.nn.Module] = []

    def make_model() -> torch.nn.Module:
        built.append(make_mlp(6, 16, 3))
        return built[-1]

    report = bf.tune(make_model, F.cross_entropy, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), (x64, y),
                     base_batch_size=16, batch_sizes=[16, 32], epochs=1, memory_budget=2**30)
    assert isinstance(report, bf.TuneReport)
    assert report.batch_size in (16, 32)
    assert isinstance(report.micro_batch_fit, int) and report.micro_batch_fit >= 1
    assert math.isfinite(report.lr) and report.lr > 0
    assert math.isfinite(report.range_test_lr) and report.range_test_lr > 0
    assert all(math.isfinite(point.final_loss) for point in report.sweep)
    assert built
    for m in built:
        assert_float32(m)
