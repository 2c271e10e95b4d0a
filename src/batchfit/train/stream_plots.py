"""Curves of a run trained from a stream: the prequential metrics over time, how late the events were, the lr."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from ..core.figures import new_figure, save_figure
from ..core.maths import ema

if TYPE_CHECKING:
    from .history import History


# Steps over which the producer's events/s is measured in the plot (one step's gap is noisy).
PRODUCED_WINDOW = 20


def production_rates(sizes: list[int], seconds: list[float], lags: list[float],
                     window: int = PRODUCED_WINDOW) -> list[float]:
    """The stream's true events/s, from the rows of a stream fit: each step's oldest event was produced at
    ``seconds - lag`` (on the run's clock), and between the oldest events of steps ``i - 1`` and ``i`` lie the
    ``sizes[i - 1]`` events of step ``i - 1``. One value per step from the second, over the last ``window`` steps
    (fewer at the start); NaN where the times are missing or do not advance."""
    produced = [s - lag for s, lag in zip(seconds, lags)]
    rates = []
    for i in range(1, len(produced)):
        first = max(0, i - window)
        span = produced[i] - produced[first]
        events = sum(sizes[first:i])
        rates.append(events / span if span > 0 and not math.isnan(span) else math.nan)
    return rates


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
    else:  # no metric besides the loss: how fast the events were trained on, and produced
        seconds = history.column("seconds")
        rates = [(samples[i] - samples[i - 1]) / max(seconds[i] - seconds[i - 1], 1e-9) for i in range(1, len(samples))]
        ax_metrics.plot(samples[1:], ema(rates), lw=1, color="tab:blue", label="trained (smoothed)")
        if "lag" in history.columns():
            produced = production_rates(history.column("batch_size"), seconds, history.column("lag"))
            ax_metrics.plot(samples[1:], produced, lw=1, color="tab:orange",
                            label=f"produced, over {PRODUCED_WINDOW} steps (from the events' times)")
            ax_metrics.legend(fontsize=8)
        ax_metrics.set(xlabel="events seen", ylabel="events/s", title="events per second: trained and produced")
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
