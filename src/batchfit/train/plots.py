"""Training curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from ..core.figures import new_figure, save_figure
from ..core.maths import ema

if TYPE_CHECKING:
    from .history import History


def plot_history(history: History, path: str | os.PathLike[str]) -> None:
    """Loss vs step and vs samples seen, lr and batch size vs step, validation metrics vs epoch."""
    fig, axes = new_figure(2, 2, (11, 7))
    steps, samples = history.column("step"), history.column("samples")
    losses = history.losses()
    (ax_step, ax_samples), (ax_lr, ax_val) = axes
    ax_step.plot(steps, losses, lw=0.8, alpha=0.5, label="step loss")
    ax_step.plot(steps, ema(losses), lw=1.5, label="smoothed")
    ax_step.set(xlabel="step", ylabel="training loss", title="loss vs step")
    ax_step.legend()
    ax_samples.plot(samples, ema(losses), lw=1.5)
    ax_samples.set(xlabel="samples seen", ylabel="training loss (smoothed)", title="loss vs samples seen")
    ax_lr.plot(steps, history.column("lr"), color="tab:green", label="lr")
    ax_lr.set(xlabel="step", ylabel="learning rate")
    sizes = history.column("batch_size")
    epochs = history.column("epoch")
    # The last batch of an epoch may be smaller; only other changes count as a varying batch size.
    varying = len({size for size, epoch, nxt in zip(sizes, epochs, epochs[1:] + [None]) if nxt == epoch}) > 1
    noise = history.column("noise_scale") if "noise_scale" in history._columns else None
    if varying or noise is not None:
        ax_batch = ax_lr.twinx()
        ax_batch.plot(steps, sizes, color="tab:purple", lw=1, label="batch size")
        if noise is not None:
            ax_batch.plot(steps, noise, color="tab:orange", lw=1, alpha=0.7, label="noise scale B_simple")
        ax_batch.set_ylabel("samples")
        ax_batch.legend(loc="upper left")
        ax_lr.set_title("learning rate, batch size")
    else:
        ax_lr.set_title(f"learning rate (batch size {sizes[0] if sizes else '-'})")
    _plot_epochs(ax_val, history)
    save_figure(fig, path)


def _plot_epochs(ax, history: History) -> None:
    epochs = history.epochs
    ax.set(xlabel="epoch", title="per epoch")
    if not epochs:
        ax.text(0.5, 0.5, "no completed epoch", ha="center", va="center", transform=ax.transAxes)
        return
    x = [record["epoch"] for record in epochs]
    ax.plot(x, [record.get("loss", math.nan) for record in epochs], marker="o", label="train loss")
    metric_names = sorted({k for record in epochs for k in record if k.startswith("val_")})
    for name in metric_names:
        ax.plot(x, [record.get(name, math.nan) for record in epochs], marker="o", label=name)
    ax.legend()
