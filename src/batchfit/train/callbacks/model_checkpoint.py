"""Keep the best model: save it whenever an epoch metric improves (Keras's ModelCheckpoint with save_best_only)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import check_choice, expected
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger("batchfit")


class ModelCheckpoint(Callback):
    """Save the model to ``path`` at the end of each epoch whose ``monitor`` is the best so far.

    ``monitor`` names a key of the epoch record (``"val_loss"``, ``"val_accuracy"``, ``"loss"``);
    ``mode="auto"`` maximises names containing "acc" and minimises the rest. With
    ``save_best_only=False`` every epoch is saved. The file is a saved model
    (:func:`batchfit.load_model` reads it), written atomically. Its best value goes into
    training checkpoints, so a resumed run keeps comparing against it.
    """

    def __init__(self, path: str | os.PathLike[str], monitor: str = "val_loss", mode: str = "auto",
                 save_best_only: bool = True) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise expected("path", "a file path", path)
        if not isinstance(monitor, str):
            raise expected("monitor", "the name of an epoch metric", monitor)
        check_choice("mode", mode, ("auto", "min", "max"))
        if not isinstance(save_best_only, bool):
            raise expected("save_best_only", "True or False", save_best_only)
        self.path = Path(path)
        self.monitor = monitor
        self.maximize = ("acc" in monitor) if mode == "auto" else mode == "max"
        self.save_best_only = save_best_only
        self.best = -math.inf if self.maximize else math.inf
        self.best_epoch: int | None = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        if self.monitor not in record:
            raise expected("monitor", f"a key of the epoch record {sorted(record)}", self.monitor)
        value = float(record[self.monitor])
        better = value > self.best if self.maximize else value < self.best
        if better:
            self.best, self.best_epoch = value, epoch
        if better or not self.save_best_only:
            if trainer.dist.is_main:
                trainer.save(self.path)
            if better:
                trainer.announce(f"Epoch {epoch}: {self.monitor} improved to {value:.4g}, saved {self.path}")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
