"""``batchfit demo``: a small CNN on real handwritten digits that ship with scikit-learn."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, check_positive_int, expected
from .models import cnn
from .run import new_run_dir, write_run_files
from .train.callbacks import CSVLogger
from .train.trainer import Trainer

logger = logging.getLogger("batchfit")


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits (1,797 images), scaled to [0, 1], split stratified by class."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise InputError("the demo needs scikit-learn: pip install 'batchfit[demo]'") from error
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    return tuple(train_test_split(images, labels, test_size=test_fraction, stratify=labels, random_state=seed))


def run_demo(batch_size: int = 32, epochs: int = 15, lr: float = 2e-3, out: str | Path = "runs",
             progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Train the digits CNN, evaluate on the held-out test split, write curves and metrics.

    Returns the summary (test accuracy, run folder, seconds). Files in ``out/<timestamp>/``:
    ``metrics.csv`` (per step), ``epochs.csv``, ``curves.png`` and ``summary.json``.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("epochs", epochs, allow_zero=True)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise expected("lr", "a positive learning rate", lr)
    x_train, x_test, y_train, y_test = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    model = cnn(in_channels=1, num_classes=10, image_size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    run_dir = new_run_dir(out)
    trainer = Trainer(model, torch.nn.functional.cross_entropy, optimizer, batch_size=batch_size,
                      device="auto", progress=True if progress else "epochs", seed=seed,
                      callbacks=[CSVLogger(run_dir)])
    start = time.perf_counter()
    history = trainer.fit((x_train, y_train), epochs=epochs, val=(x_test, y_test))
    seconds = time.perf_counter() - start
    test = trainer.evaluate((x_test, y_test))
    summary = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "train_samples": len(y_train),
               "test_samples": len(y_test), "batch_size": batch_size, "epochs": epochs, "lr": lr,
               "steps": trainer.step, "seconds": seconds, "run_dir": str(run_dir)}
    write_run_files(run_dir, history, summary)
    summary["files"] = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The lines printed at the end of the demo."""
    return (
        f"digits CNN: {summary['train_samples']} training / {summary['test_samples']} test images, "
        f"batch {summary['batch_size']}, {summary['epochs']} epochs, {summary['steps']} steps "
        f"in {summary['seconds']:.1f} s\n"
        f"test accuracy {summary['test_accuracy']:.3f}  (test loss {summary['test_loss']:.3f})\n"
        f"wrote {summary['run_dir']}/: {', '.join(summary.get('files', []))}"
    )
