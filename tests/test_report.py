"""tune(): the recommendation, its evidence and the files it writes."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.report import SweepPoint, default_target


def test_default_target_is_loosest_best_loss_of_points_that_learned():
    learned = SweepPoint(8, 0.1, None, None, None, 0.3, [(1, 8, 0.1, 1.0), (2, 16, 0.2, 0.3)])
    slower = SweepPoint(16, 0.2, None, None, None, 0.5, [(1, 16, 0.1, 1.0), (2, 32, 0.2, 0.5)])
    diverged = SweepPoint(32, 0.4, None, None, None, 9.0, [(1, 32, 0.1, 1.0), (2, 64, 0.2, 9.0)])
    assert default_target([learned, slower, diverged]) == 0.5


def test_tune_recommends_from_measurements_and_saves_report(tmp_path, make_mlp):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 5)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    report = bf.tune(lambda: make_mlp(5, 16, 2), F.cross_entropy,
                     lambda model: torch.optim.SGD(model.parameters(), lr=0.01), (x, y),
                     base_batch_size=16, batch_sizes=[8, 16, 32], epochs=2, memory_budget=2**30)
    assert report.batch_size in (8, 16, 32)
    assert report.micro_batch_fit >= 1 and report.micro_batch_size is None
    point = next(p for p in report.sweep if p.batch_size == report.batch_size)
    assert report.lr == point.lr
    assert all(p.lr == bf.scale_lr(report.range_test_lr, 16, p.batch_size, "linear") for p in report.sweep)
    assert point.seconds_to_target == min(p.seconds_to_target for p in report.sweep
                                          if p.seconds_to_target is not None)
    folder = report.save(tmp_path / "report")
    for name in ("report.md", "report.json", "sweep.png", "lr_range.png", "throughput.png"):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "report.json").read_text())
    assert saved["batch_size"] == report.batch_size
    assert f"batch_size={report.batch_size}" in report.summary()


def test_tune_checks_the_target_inside_epochs_and_ends_with_a_config_block(make_mlp):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 5)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    report = bf.tune(lambda: make_mlp(5, 16, 2), F.cross_entropy,
                     lambda model: torch.optim.SGD(model.parameters(), lr=0.01), (x, y), val=(x, y),
                     base_batch_size=16, batch_sizes=[16, 32], epochs=2, memory_budget=2**30)
    point = next(p for p in report.sweep if p.batch_size == 16)
    steps = [c[0] for c in point.curve]
    assert len(steps) > 2 and steps[0] < 16  # 16 steps an epoch: checked every 2, not only at 16 and 32
    assert "all 256 samples fit in memory at once" in report.reasons["micro_batch_size"]
    block = report.summary().split("to use it, put this in the run's config:\n")[1]
    assert block == report.config_block()
    assert f"batch_size = {report.batch_size}" in block and "[optimizer]\nlr = " in block
