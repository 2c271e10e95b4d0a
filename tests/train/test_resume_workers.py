"""Invariant 4 with worker processes: a run with dropout, a random augmentation and workers=2,
stopped mid-epoch and resumed from its checkpoint, ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit import Callback, Trainer


class StopAfter(Callback):
    """Ends ``fit`` after ``steps`` steps (the checkpoint of the last one is on disk)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if record["step"] >= self.steps:
            trainer.stop_training = True


def jitter(batch):
    """A random augmentation, drawn in the worker that gathers the batch."""
    x, y = batch
    return x + 0.1 * torch.randn(x.shape), y


def run(folder, stop_after: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5).astype(np.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
    callbacks = [StopAfter(stop_after)] if stop_after is not None else []
    trainer = Trainer(model, F.cross_entropy, torch.optim.Adam(model.parameters(), lr=0.01), batch_size=16,
                      shuffle=True, seed=1, workers=2, transform=jitter, checkpoint_dir=folder, checkpoint_every=1,
                      progress=False, callbacks=callbacks)
    trainer.fit((x, y), epochs=2, resume=True)
    return {k: v.clone() for k, v in model.state_dict().items()}, trainer.step


@pytest.mark.parametrize("stop_after", [3, 8])  # mid-epoch in the first and in the second epoch
def test_resume_with_workers_mid_epoch_is_bit_identical(tmp_path, stop_after):
    expected, steps = run(tmp_path / "uninterrupted")
    _, stopped_at = run(tmp_path / "resumed", stop_after)
    assert stopped_at == stop_after and stop_after % 6  # 6 steps an epoch: stopped inside one
    resumed, resumed_steps = run(tmp_path / "resumed")
    assert resumed_steps == steps == 12
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
