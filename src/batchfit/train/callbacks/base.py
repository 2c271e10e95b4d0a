"""The callback protocol: hooks into fit with no-op defaults; only overridden hooks are called."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..history import History
    from ..trainer import Trainer

HOOKS = ("on_fit_begin", "on_fit_end", "on_epoch_begin", "on_epoch_end", "on_step_begin", "on_step_end", "on_log")


class Callback:
    """Override any hook; the others cost nothing (the trainer only calls overridden hooks).

    Set ``trainer.stop_training = True`` from a hook to end ``fit`` after the current step.
    """

    def on_fit_begin(self, trainer: Trainer) -> None:
        """Called once before the first step."""

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        """Called once after the last step (also when stopped early)."""

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        """Called before the first step of each epoch (``epoch`` counts from 1, as everywhere users see it)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        """Called after each epoch (counted from 1) with its record (train loss, validation metrics)."""

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        """Called before each step (``step`` counts completed steps so far)."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Called after each step with its record (step, epoch, samples, batch_size, loss, lr, seconds)."""

    def on_log(self, trainer: Trainer) -> None:
        """Called every few seconds (``LOG_EVERY``) while training, with the history read back: for loggers."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def overriding(callbacks: list[Callback], hook: str) -> list[Any]:
    """The bound ``hook`` methods of the callbacks that override it."""
    return [getattr(cb, hook) for cb in callbacks if getattr(type(cb), hook) is not getattr(Callback, hook)]
