"""Guards around the loop: non-finite losses and stop signals."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import NonFiniteLossError
from .history import History


def non_finite_error(value: float, step: int, epoch: int) -> NonFiniteLossError:
    """The error for a NaN or infinite loss: names the step and epoch and what to do."""
    return NonFiniteLossError(f"the loss of step {step} (epoch {epoch}) is {value}; lower the learning rate, "
                              f"set max_grad_norm, or use on_nan='skip'", step=step, epoch=epoch)


def check_losses(history: History, checked: int) -> int:
    """Raise on the first non-finite loss recorded after the first ``checked`` steps; returns the new count.

    On CUDA losses are read back lazily (a readback is a device sync), so ``on_nan="raise"``
    checks them here, whenever they are read back anyway.
    """
    losses = history.losses()
    for index in range(max(0, checked - history.dropped), len(losses)):  # ``checked`` counts dropped rows too
        if not math.isfinite(losses[index]):
            record = history.record(index)
            raise non_finite_error(losses[index], record["step"], record["epoch"])
    return max(checked, history.total)


class SignalGuard:
    """Notes SIGTERM/SIGINT while installed, so that the loop can finish its step, save and exit."""

    def __init__(self) -> None:
        self.received: int | None = None

    @contextmanager
    def installed(self, enabled: bool) -> Iterator[None]:
        """Catch the signals in the body (only with ``enabled`` and on the main thread)."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, frame: Any) -> None:
            self.received = signum

        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def exit_for(signum: int) -> BaseException:
    """What to raise after saving on a signal: KeyboardInterrupt for SIGINT, exit status 128+N otherwise."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + int(signum))
