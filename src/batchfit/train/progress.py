"""A per-epoch progress bar that is refreshed by wall time, not by step."""

from __future__ import annotations

import os
import sys
from typing import IO, Any

FALLBACK_SIZE = os.terminal_size((80, 20))  # columns and lines where the terminal reports 0


class Progress:
    """tqdm bar with batches done/total, samples/s, running loss and lr.

    The trainer calls :meth:`due` (one float comparison) every step and :meth:`refresh` only
    when it returns True, so the bar costs nothing measurable per step.
    """

    def __init__(self, enabled: bool, interval: float = 0.25, epochs_only: bool = False) -> None:
        self.enabled = enabled and not epochs_only  # the bar
        self.epoch_lines = enabled  # one line per finished epoch, with or without a bar
        self.interval = interval
        self.next_refresh = float("inf")
        self._bar: Any = None
        self._shown = 0

    def start_epoch(self, epoch: int, epochs: int, total: int, already: int, now: float) -> None:
        """Open the bar of one epoch (``already`` batches done when resuming)."""
        self._epochs = epochs
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        # tqdm draws nothing on a terminal that reports 0 columns or 0 lines (some CI runners and
        # containers); the bar then keeps a fixed size instead of following the terminal's.
        size = terminal_size(sys.stderr)
        dynamic = size is None or min(size) > 0
        fixed = {} if dynamic else {"ncols": FALLBACK_SIZE.columns, "nrows": FALLBACK_SIZE.lines}
        self._bar = tqdm(total=total, initial=already, desc=f"epoch {epoch}/{epochs}", unit="batch",
                         file=sys.stderr, dynamic_ncols=dynamic, leave=True, mininterval=0, **fixed)
        self._shown = already
        self.next_refresh = now + self.interval

    @staticmethod
    def write(message: str) -> None:
        """Print a line without breaking a bar that is being drawn."""
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    def due(self, now: float) -> bool:
        """Whether a refresh is due (cheap; called every step)."""
        return now >= self.next_refresh

    def refresh(self, now: float, batches_done: int, samples_per_s: float, loss: float, lr: float,
                note: str = "") -> None:
        """Show the state at ``batches_done`` batches into the epoch (``note``: the feed's own, e.g. dead letters)."""
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"loss={loss:.4g} lr={lr:.3g} {samples_per_s:,.0f} samples/s{note}", refresh=False)
        self._bar.update(batches_done - self._shown)
        self._shown = batches_done
        self.next_refresh = now + self.interval

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Close the bar and print the epoch's line: its loss and every validation metric.

        The line is printed on its own (it wraps on a narrow terminal instead of being cut off
        like a bar's postfix), also when there is no bar (``progress="epochs"``).
        """
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={record['loss']:.4g}", refresh=False)
            self._bar.update(self._bar.total - self._shown if self._bar.total else 0)
            self._bar.close()
            self._bar = None
        self.next_refresh = float("inf")
        if self.epoch_lines:
            self.write(epoch_line(record, getattr(self, "_epochs", None)))


def epoch_line(record: dict[str, Any], epochs: int | None = None) -> str:
    """``epoch 3/10: loss 0.1234, val_loss 0.2345, val_accuracy 0.9512 (12.3 s)``."""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                      if (k == "loss" or k.startswith("val_") or k == "skipped_steps") and isinstance(v, (int, float)))
    of = f"/{epochs}" if epochs else ""
    return f"epoch {record['epoch']}{of}: {shown} ({record['seconds']:.1f} s)"


def terminal_size(file: IO[str]) -> os.terminal_size | None:
    """The size the terminal behind ``file`` reports, or ``None`` where ``file`` is no terminal."""
    try:
        return os.get_terminal_size(file.fileno())
    except (AttributeError, ValueError, OSError):
        return None
