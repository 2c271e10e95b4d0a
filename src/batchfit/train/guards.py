"""Guards around the loop: non-finite losses and stop signals."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import NonFiniteLossError
from .history import History


def non_finite_error(value: float, step: int, epoch: int, data: str | None = None,
                     ranks: int = 1) -> NonFiniteLossError:
    """The error for a NaN or infinite loss: names the step and epoch and what to do — the data's
    NaN/inf (``data``, from :func:`non_finite_data`) when the batch held any, else the learning rate.
    ``data=None``: the batch was not checked (a loss read back later); ``ranks``: processes sharing the batch."""
    if data:
        return NonFiniteLossError(f"the loss of step {step} (epoch {epoch}) is {value} because {data}: clean the data "
                                  f"(drop those samples, or np.nan_to_num); the learning rate is not the cause",
                                  step=step, epoch=epoch)
    checked = "" if data is None else "the batch's data is finite: " if ranks == 1 else \
        "this process's share of the batch is finite: "
    return NonFiniteLossError(f"the loss of step {step} (epoch {epoch}) is {value}; {checked}lower the learning "
                              f"rate, set max_grad_norm, or use on_nan='skip'", step=step, epoch=epoch)


def non_finite_data(batch: Any, ids: Any = None, most: int = 5) -> str:
    """Where a batch's floating-point data holds NaN or inf, in words (``""`` when nowhere): the array
    and the samples — their indices in the data set when ``ids`` maps rows to them, else rows of the batch."""
    if batch is None:
        return ""
    batch = getattr(batch, "batch", batch)  # a stream's batch carries its tensors with the events' ids
    if not isinstance(batch, (dict, tuple, list)):
        return ""
    items = list(batch.items()) if isinstance(batch, dict) else [
        (f"arrays[{i}]" + (" (the target)" if i == len(batch) - 1 and len(batch) > 1 else ""), t)
        for i, t in enumerate(batch)]
    found = []
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() == 0:
            continue
        bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        if not bool(bad.any()):
            continue
        rows = torch.nonzero(bad).flatten().cpu().numpy()
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
        if bool(torch.isnan(tensor).any()) and bool(torch.isinf(tensor).any()):
            kind = "NaN and inf"
        where = [int(ids[r]) for r in rows[:most]] if ids is not None else [int(r) for r in rows[:most]]
        more = f" and {len(rows) - most} more" if len(rows) > most else ""
        what = "samples" if ids is not None else "rows of the batch"
        found.append(f"{name} holds {kind} in {len(rows)} sample(s) ({what} {where}{more})")
    return "the batch's data is not finite: " + "; ".join(found) if found else ""


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
