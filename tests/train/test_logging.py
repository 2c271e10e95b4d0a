"""Watching a run while it goes: CSV files that grow during the run, TensorBoard scalars, validation
every N steps, and one line per epoch."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.train import trainer as trainer_module


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def make(callbacks=(), **options) -> bf.Trainer:
    model = mlp()
    options.setdefault("progress", False)
    return bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=10,
                      callbacks=list(callbacks), **options)


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_logger_has_rows_while_the_run_is_still_going(tmp_path, classification, monkeypatch):
    monkeypatch.setattr(trainer_module, "LOG_EVERY", 0.0)  # log at every step, to see it happen
    seen = []

    class Look(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] in (3, 13):
                seen.append(len(rows(tmp_path / "metrics.csv")))

    trainer = make([bf.CSVLogger(tmp_path), Look()])
    trainer.fit(classification, epochs=2, val=classification)
    assert seen[0] >= 2 and seen[1] >= 12  # written during the run, not at its end
    final = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in final] == list(range(1, 21))
    assert [float(r["loss"]) for r in final] == pytest.approx(trainer.history.losses())
    epochs = rows(tmp_path / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2] and "val_accuracy" in epochs[0]


def test_csv_logger_after_resume_matches_the_history(tmp_path, classification):
    class Crash(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 13:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make([bf.CSVLogger(tmp_path / "log"), Crash()], checkpoint_dir=tmp_path / "ckpt",
             checkpoint_every=5).fit(classification, epochs=2)
    resumed = make([bf.CSVLogger(tmp_path / "log")], checkpoint_dir=tmp_path / "ckpt", checkpoint_every=5)
    resumed.fit(classification, epochs=2, resume=True)
    assert [int(r["step"]) for r in rows(tmp_path / "log" / "metrics.csv")] == list(range(1, 21))


def test_val_every_validates_inside_epochs(tmp_path, classification):
    trainer = make([bf.CSVLogger(tmp_path)], val_every=4)
    trainer.fit(classification, epochs=2, val=classification)
    validations = trainer.history.validations
    assert [v["step"] for v in validations] == [4, 8, 12, 16, 20]
    assert [v["epoch"] for v in validations] == [1, 1, 2, 2, 2]
    last = validations[-1]
    assert last["val_loss"] == pytest.approx(trainer.evaluate(classification)["loss"], rel=1e-6)
    assert len(rows(tmp_path / "validation.csv")) == 5


def test_tensorboard_logger_writes_the_scalars(tmp_path, classification):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make([bf.TensorBoardLogger(tmp_path)], val_every=5, noise_scale=True)
    trainer.fit(classification, epochs=2, val=classification)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/batch_size", "epoch/val_loss", "epoch/val_accuracy",
            "val/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(trainer.history.losses(), rel=1e-6)


def test_progress_epochs_prints_one_line_per_epoch(classification, capsys):
    make(progress="epochs").fit(classification, epochs=2, val=classification)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2: loss ") and "val_accuracy" in lines[1]


def test_early_stopping_is_announced(classification, capsys):
    x, y = classification
    trainer = make([bf.EarlyStopping(monitor="val_loss", patience=1)], progress=True)
    trainer.optimizer.param_groups[0]["lr"] = 0.5
    trainer.base_lrs = [0.5]
    trainer.fit((x, y), epochs=30, val=(x, (y + 1) % 3))
    err = capsys.readouterr().err
    assert "early stopping (val_loss has not improved" in err and "Restored the weights of epoch" in err
