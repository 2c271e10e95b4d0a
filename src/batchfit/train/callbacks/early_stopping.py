"""Early stopping: end fit when an epoch metric stops improving, optionally keeping the best weights."""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Any

from ...errors import check_choice, check_positive_int, expected
from .base import Callback

if TYPE_CHECKING:
    from ..history import History
    from ..trainer import Trainer

logger = logging.getLogger("batchfit")


class EarlyStopping(Callback):
    """Stop when an epoch metric has not improved for ``patience`` epochs.

    ``monitor`` names a key of the epoch record (``"val_loss"``, ``"val_accuracy"``, ``"loss"``);
    ``mode="auto"`` maximises names containing "acc" and minimises the rest. With
    ``restore_best=True`` the model gets back the weights of its best epoch at the end.
    Its state (best weights included) goes into checkpoints, so a resumed run stops where the
    uninterrupted run would have, and resuming a run that has stopped trains no further.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0,
                 mode: str = "auto", restore_best: bool = True) -> None:
        self.monitor = monitor
        self.patience = check_positive_int("patience", patience, allow_zero=True)
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise expected("min_delta", "a non-negative number", min_delta)
        self.min_delta = float(min_delta)
        check_choice("mode", mode, ("auto", "min", "max"))
        self.maximize = ("acc" in monitor) if mode == "auto" else mode == "max"
        self.restore_best = restore_best
        self._reset()
        self._resumed = False

    def _reset(self) -> None:
        self.best = -math.inf if self.maximize else math.inf
        self.bad_epochs = 0
        self.best_epoch: int | None = None
        self.stopped = False
        self._best_weights: dict[str, Any] | None = None

    def on_fit_begin(self, trainer: Trainer) -> None:
        if not self._resumed:
            self._reset()  # a new run starts from scratch, also with a callback used before
        elif self.stopped:
            trainer.stop_training = True  # the run had already stopped when it was checkpointed
        self._resumed = False

    def _improved(self, value: float) -> bool:
        if self.maximize:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        if self.monitor not in record:
            raise expected("monitor", f"a key of the epoch record {sorted(record)}", self.monitor)
        value = float(record[self.monitor])
        if self._improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            if self.restore_best:
                self._best_weights = copy.deepcopy(trainer.module.state_dict())
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            trainer.announce(f"Epoch {epoch}: early stopping ({self.monitor} has not improved on "
                             f"{self.best:.4g} of epoch {self.best_epoch} for {self.bad_epochs} epochs)")
            self.stopped = trainer.stop_training = True

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        self._resumed = False  # (a rollback inside fit loads the state too)
        if self.restore_best and self._best_weights is not None and self.bad_epochs:
            trainer.module.load_state_dict(self._best_weights)
            trainer.announce(f"Restored the weights of epoch {self.best_epoch}, the best "
                             f"{self.monitor} ({self.best:.4g})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "best_epoch": self.best_epoch,
                "stopped": self.stopped, "best_weights": self._best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs, self.best_epoch = state["best"], state["bad_epochs"], state["best_epoch"]
        self.stopped, self._best_weights = state.get("stopped", False), state.get("best_weights")
        self._resumed = True
