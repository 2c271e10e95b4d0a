"""Curves of a run trained from a stream: the prequential metrics over time, how late the events were, the lr."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from ..core.figures import new_figure, save_figure
from ..core.maths import ema

if TYPE_CHECKING:
    from .history import History


def is_stream_history(history: History) -> bool:
    """Whether ``history`` was recorded by training from a stream (it has prequential columns)."""
    return "preq_loss" in history.columns()


def plot_stream_history(history: History, path: str | os.PathLike[str],
                        reference: dict[str, float] | None = None) -> None:
    """A PNG of the prequential (test-then-train) metrics against events seen and the lr, lag and batch size.

    Each metric is drawn twice: the mean over every event so far (``preq_<name>``) and over the last
    events (``preq_<name>_window``). ``reference`` adds horizontal lines, e.g. ``{"offline": 1.02}``,
    in the units of the first panel.
    """
    figure, axes = new_figure(2, 2, (11, 7))
    (ax_loss, ax_metrics), (ax_lag, ax_lr) = axes
    samples = history.column("samples")
    _prequential(ax_loss, samples, history, "loss")
    for label, value in (reference or {}).items():
        ax_loss.axhline(value, color="grey", ls="--", lw=1)
        ax_loss.text(samples[-1] if samples else 0, value, f" {label}", va="bottom", ha="right", fontsize=8)
    names = sorted(c[len("preq_"):] for c in history.columns()
                   if c.startswith("preq_") and not c.endswith("_window") and c != "preq_loss")
    if names:
        for name in names:
            _prequential(ax_metrics, samples, history, name)
    else:  # no metric besides the loss: how fast the events were trained on
        seconds = history.column("seconds")
        rates = [(samples[i] - samples[i - 1]) / max(seconds[i] - seconds[i - 1], 1e-9) for i in range(1, len(samples))]
        ax_metrics.plot(samples[1:], ema(rates), lw=1, color="tab:blue")
        ax_metrics.set(xlabel="events seen", ylabel="events/s", title="events trained per second (smoothed)")
    steps = history.column("step")
    lag = history.column("lag") if "lag" in history.columns() else []
    ax_lag.plot(steps, [v if v is not None else math.nan for v in lag], lw=0.8, color="tab:red")
    ax_lag.set(xlabel="step", ylabel="seconds", title="lag: oldest event of a batch, produced -> trained")
    ax_size = ax_lag.twinx()
    ax_size.plot(steps, history.column("batch_size"), lw=0.8, color="tab:purple", alpha=0.6)
    ax_size.set_ylabel("batch size (events)")
    ax_lr.plot(steps, history.column("lr"), color="tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    save_figure(figure, path)


def _prequential(ax: Any, samples: list[int], history: History, name: str) -> None:
    ax.plot(samples, history.column(f"preq_{name}"), lw=1.5, label=f"{name}: every event so far")
    window = f"preq_{name}_window"
    if window in history.columns():
        ax.plot(samples, history.column(window), lw=0.8, alpha=0.7, label=f"{name}: recent events")
    ax.set(xlabel="events seen", ylabel=name, title=f"prequential {name} (scored before training)")
    ax.legend()
