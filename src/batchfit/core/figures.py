"""Figures: one plotting style for every PNG batchfit writes.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting needs no
display and never changes the user's pyplot backend or state. They are saved atomically.
"""

from __future__ import annotations

import os
from typing import Any

from .durable import atomic_write


def new_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """``(figure, axes)`` with ``axes`` a ``rows`` × ``cols`` array, drawn off-screen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def save_figure(figure: Any, path: str | os.PathLike[str]) -> None:
    """Lay out and write ``figure`` as a PNG at ``path``, atomically."""
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
