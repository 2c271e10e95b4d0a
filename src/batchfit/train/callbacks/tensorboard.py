"""TensorBoard scalars while the run goes (``torch.utils.tensorboard``; the ``tensorboard`` extra)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from ...errors import InputError, expected
from .base import Callback

if TYPE_CHECKING:
    from ..history import History
    from ..trainer import Trainer


class TensorBoardLogger(Callback):
    """Logs ``train/loss``, ``train/lr``, ``train/batch_size`` and ``train/noise_scale`` per step, and the
    epoch and ``val_every`` validation metrics (``val/...``), against the step, to ``log_dir``.

    Steps are written in bulk every few seconds (the trainer's ``on_log``), so logging costs no
    device sync per step. Open with ``tensorboard --logdir LOG_DIR``.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise expected("log_dir", "a folder path", log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise InputError("TensorBoardLogger needs the tensorboard package: pip install "
                                "'batchfit[tensorboard]'") from error
        self.log_dir = os.fspath(log_dir)
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self._steps = self._epochs = self._validations = 0

    def on_fit_begin(self, trainer: Trainer) -> None:
        if trainer.dist.is_main and self._writer is None:
            self._writer = self._writer_class(self.log_dir)
        self._steps = trainer.history.total  # a resumed run logs from where it goes on
        if self._flush not in trainer.history.before_drop:  # a stream's history drops its older rows
            trainer.history.before_drop.append(self._flush)
        self._epochs, self._validations = len(trainer.history.epochs), len(trainer.history.validations)

    def on_log(self, trainer: Trainer) -> None:
        self._flush(trainer.history)

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        self._flush(trainer.history)

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        self._flush(history)
        if self._writer is not None:
            self._writer.flush()

    def _flush(self, history: History) -> None:
        writer = self._writer
        if writer is None:
            return
        for index in range(max(0, self._steps - history.dropped), len(history)):
            record = history.record(index)
            for name in ("loss", "lr", "batch_size", "noise_scale"):
                value = record.get(name)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"train/{name}", value, record["step"])
        self._steps = history.total
        for record in history.epochs[self._epochs:]:
            for name, value in record.items():
                if name not in ("epoch", "steps", "samples", "seconds") and isinstance(value, (int, float)):
                    writer.add_scalar(f"epoch/{name}", value, record["steps"])
        self._epochs = len(history.epochs)
        for record in history.validations[self._validations:]:
            for name, value in record.items():
                if name.startswith("val_") and isinstance(value, (int, float)):
                    writer.add_scalar(f"val/{name[4:]}", value, record["step"])
        self._validations = len(history.validations)
        writer.flush()
