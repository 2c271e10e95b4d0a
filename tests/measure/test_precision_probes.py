"""Probes measure in the precision the run trains in: bf16 on the CPU runs the forward pass in bf16.

A forward hook on the model's first ``nn.Linear`` records the dtype of its output: under
``torch.autocast("cpu", dtype=torch.bfloat16)`` that is ``torch.bfloat16``, without it
``torch.float32``. A probe that measured in fp32 for a bf16 run would measure another model
(other speed, other memory, other gradient noise).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


@pytest.fixture
def recorded(make_mlp) -> tuple[torch.nn.Module, list[torch.dtype]]:
    """A float32 MLP 6 -> 16 -> 3 and the list its first Linear appends its output dtype to."""
    model = make_mlp(6, 16, 3)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    dtypes: list[torch.dtype] = []
    first.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    return model, dtypes


class MarkFitBegin(bf.Callback):
    """Remembers how many forward passes came before training began (the measurements')."""

    def __init__(self, dtypes: list[torch.dtype]) -> None:
        self.dtypes = dtypes
        self.before_training: int | None = None

    def on_fit_begin(self, trainer) -> None:
        self.before_training = len(self.dtypes)


def assert_all(dtypes: list[torch.dtype], expected: torch.dtype, what: str) -> None:
    assert dtypes, f"{what}: no forward pass went through the model"
    wrong = sorted({str(d) for d in dtypes if d != expected})
    assert not wrong, f"{what}: {len(dtypes)} forward passes, some in {wrong} instead of {expected}"


def test_recording_model_default_forward_is_float32(recorded, data):
    model, dtypes = recorded
    model(torch.as_tensor(data[0][:4]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.as_tensor(data[0][:4]))
    assert dtypes == [torch.float32, torch.bfloat16]  # the probe itself tells the two apart


def test_trainer_auto_batch_size_bf16_measures_in_bf16(recorded, data):
    model, dtypes = recorded
    mark = MarkFitBegin(dtypes)
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size="auto",
                         precision="bf16", progress=False, callbacks=[mark])
    dtypes.clear()
    history = trainer.fit(data, epochs=1)
    assert history.steps and mark.before_training is not None
    assert_all(dtypes[: mark.before_training], torch.bfloat16, "batch_size='auto' measurement")
    assert_all(dtypes[mark.before_training:], torch.bfloat16, "bf16 training")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_trainer_auto_micro_batch_size_bf16_measures_in_bf16(recorded, data):
    model, dtypes = recorded
    mark = MarkFitBegin(dtypes)
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=32,
                         micro_batch_size="auto", precision="bf16", progress=False, callbacks=[mark])
    dtypes.clear()
    history = trainer.fit(data, epochs=1)
    assert len(history.steps) == 256 // 32 and mark.before_training is not None
    assert_all(dtypes[: mark.before_training], torch.bfloat16, "micro_batch_size='auto' measurement")
    assert_all(dtypes, torch.bfloat16, "micro_batch_size='auto' run")


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), (None, torch.float32)])
def test_lr_range_test_precision_runs_forward_in_precision(recorded, data, precision, expected):
    model, dtypes = recorded
    kwargs = {} if precision is None else {"precision": precision}
    result = bf.lr_range_test(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), data,
                              num_steps=10, batch_size=16, **kwargs)
    assert math.isfinite(result.suggested_lr) and result.suggested_lr > 0
    assert_all(dtypes, expected, f"lr_range_test(precision={precision!r})")
    assert len(dtypes) >= len(result.lrs)  # at least one forward pass per step


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), (None, torch.float32)])
def test_estimate_noise_scale_precision_runs_forward_in_precision(recorded, data, precision, expected):
    model, dtypes = recorded
    kwargs = {} if precision is None else {"precision": precision}
    noise = bf.estimate_noise_scale(model, F.cross_entropy, data, small_batch=8, big_batch=32, num_batches=2,
                                    **kwargs)
    assert isinstance(noise.b_simple, float) and not math.isnan(noise.b_simple)
    assert_all(dtypes, expected, f"estimate_noise_scale(precision={precision!r})")


@pytest.mark.parametrize("fn", ["lr_range_test", "estimate_noise_scale"])
def test_probe_precision_unknown_raises(recorded, data, fn):
    model, _ = recorded
    if fn == "lr_range_test":
        call = lambda: bf.lr_range_test(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),  # noqa: E731
                                        data, num_steps=2, batch_size=16, precision="fp8")
    else:
        call = lambda: bf.estimate_noise_scale(model, F.cross_entropy, data, small_batch=8, big_batch=32,  # noqa: E731
                                               num_batches=1, precision="fp8")
    with pytest.raises(ValueError, match=r"precision.*fp8"):
        call()
