"""The MovieLens-100k recipe measured: its prequential RMSE over time against a model trained offline on the
same events.

The stream model sees the 100,000 ratings once, in time order, and scores each batch before it trains on it
(prequential RMSE, over the whole pass and per window of events). The offline model is trained the usual
way: epochs over shuffled ratings of the first 70 % (the past), the number of epochs chosen on the next
10 % (early stopping on held-out RMSE), then frozen and scored on the last 20 % — the same events on
which the stream model's prequential RMSE is also reported, while it keeps learning from them.
Reference figures from docs/offline.md (one pass, prequential, measured with other tools on this machine
kind): river BiasedMF 0.949, PyTorch MF d=16 Adam at batch 32: 1.024.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchfit.core.figures import new_figure, save_figure
from batchfit.data.streams import StreamSource
from batchfit.train.trainer import Trainer
from batchfit.workloads.stream import MatrixFactorization, load_movielens_100k, rmse_loss

# One pass, prequential RMSE on ML-100k in time order, from docs/offline.md (measured outside batchfit).
REFERENCES = {"river BiasedMF (docs/offline.md)": 0.949, "PyTorch MF, batch 32 (docs/offline.md)": 1.024}
PAST, VALIDATION = 0.7, 0.8  # the offline model trains on [0, 70 %), picks its epochs on [70 %, 80 %)


def stream_rmse(columns: dict[str, np.ndarray], batch_size: int, lr: float, window: int,
                sparse: bool = False, table_scale: int = 1) -> dict[str, Any]:
    """One prequential pass over the ratings in time order: overall RMSE, RMSE per ``window`` events, events/s.

    ``sparse``: sparse embedding gradients with ``SparseAdam`` (only the rows of a batch's users and items
    are updated) instead of dense ones with Adam. ``table_scale`` multiplies the rows of the embedding
    tables (a catalogue that many times larger, of which these ratings touch the first rows).
    """
    events = list(zip(columns["user"].tolist(), columns["item"].tolist(), columns["rating"].tolist()))
    model = MatrixFactorization(943 * table_scale, 1682 * table_scale, dim=16, sparse=sparse)
    optimizer = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(list(model.parameters()), lr=lr)
    trainer = Trainer(model, rmse_loss, optimizer, batch_size=batch_size, progress=False)
    start = time.perf_counter()
    history = trainer.fit(StreamSource(events))
    seconds = time.perf_counter() - start
    losses, sizes = history.losses(), history.column("batch_size")
    first = np.cumsum([0] + sizes[:-1])  # the index of each batch's first event
    windows = []
    for begin in range(0, len(events), window):
        chosen = [(loss, size) for loss, size, at in zip(losses, sizes, first) if begin <= at < begin + window]
        windows.append(math.sqrt(sum(loss * size for loss, size in chosen) / sum(size for _, size in chosen)))
    test_from = int(VALIDATION * len(events))
    tail = [(loss, size) for loss, size, at in zip(losses, sizes, first) if at >= test_from]
    return {"batch_size": batch_size, "lr": lr, "sparse": sparse,
            "preq_rmse": math.sqrt(history.column("preq_loss")[-1]), "window": window, "window_rmse": windows,
            "events_per_s": len(events) / seconds,
            "test_rmse": math.sqrt(sum(loss * size for loss, size in tail) / sum(size for _, size in tail))}


def sparse_against_dense(columns: dict[str, np.ndarray], batch_sizes: Sequence[int], lr: float, events: int = 10_000,
                         repeats: int = 3, table_scales: Sequence[int] = (1, 100)) -> list[dict[str, Any]]:
    """Events/s of sparse embedding gradients (SparseAdam) against dense ones (Adam) on the first ``events``
    ratings, with ML-100k's tables and with tables ``table_scale`` times larger: the median of ``repeats``
    interleaved runs each, and their ratio."""
    part = {k: v[:events] for k, v in columns.items()}
    keys = [(b, scale, s) for scale in table_scales for b in batch_sizes for s in (False, True)]
    rates: dict[tuple[int, int, bool], list[float]] = {key: [] for key in keys}
    for repeat in range(repeats):
        for b, scale, s in keys[repeat % len(keys):] + keys[: repeat % len(keys)]:
            rates[(b, scale, s)].append(stream_rmse(part, b, lr, events, sparse=s, table_scale=scale)["events_per_s"])
    rows = []
    for scale in table_scales:
        for b in batch_sizes:
            dense, sparse = float(np.median(rates[(b, scale, False)])), float(np.median(rates[(b, scale, True)]))
            rows.append({"batch_size": b, "table_scale": scale, "dense_events_per_s": dense,
                         "sparse_events_per_s": sparse, "sparse_over_dense": sparse / dense, "events": events,
                         "repeats": repeats})
    return rows


def offline_rmse(columns: dict[str, np.ndarray], batch_size: int, lr: float, max_epochs: int,
                 window: int) -> dict[str, Any]:
    """The offline model: epochs over the past, early-stopped on the next 10 %, scored on the last 20 %."""
    arrays = (columns["user"], columns["item"], columns["rating"])
    count = len(arrays[0])
    past, validation = int(PAST * count), int(VALIDATION * count)
    model = MatrixFactorization(943, 1682, dim=16)
    trainer = Trainer(model, rmse_loss, torch.optim.Adam(model.parameters(), lr=lr), batch_size=batch_size,
                      progress=False, seed=0)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, max_epochs + 1):
        trainer.fit(tuple(a[:past] for a in arrays), epochs=1)
        held_out = math.sqrt(trainer.evaluate(tuple(a[past:validation] for a in arrays))["loss"])
        if best is None or held_out < best[0]:
            best = (held_out, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    assert best is not None
    model.load_state_dict(best[2])
    windows = [math.sqrt(trainer.evaluate(tuple(a[begin : min(begin + window, count)] for a in arrays))["loss"])
               for begin in range(validation, count, window)]
    return {"batch_size": batch_size, "lr": lr, "epochs": best[1], "validation_rmse": best[0],
            "test_rmse": math.sqrt(trainer.evaluate(tuple(a[validation:] for a in arrays))["loss"]),
            "test_from": validation, "window": window, "window_rmse": windows}


def recipe_table(batch_sizes: Sequence[int] = (32, 256), lr: float = 0.01, window: int = 10_000,
                 max_epochs: int = 8, plot: str | Path | None = None) -> dict[str, Any]:
    """The stream recipe at each batch size and the offline model (batch 256), on MovieLens-100k; optionally a PNG."""
    torch.set_num_threads(1)
    columns = load_movielens_100k()
    result = {"stream": [stream_rmse(columns, b, lr, window) for b in batch_sizes],
              "sparse": [stream_rmse(columns, b, lr, window, sparse=True) for b in batch_sizes],
              "offline": offline_rmse(columns, 256, lr, max_epochs, window),
              "sparse_speed": sparse_against_dense(columns, batch_sizes, lr)}
    if plot is not None:
        plot_recipe(result, plot)
    return result


def plot_recipe(result: dict[str, Any], path: str | Path) -> None:
    """Prequential RMSE per window of events for each batch size, the offline model on its test windows."""
    figure, axes = new_figure(1, 1, (8, 4.5))
    ax = axes[0][0]
    for row in result["stream"]:
        centres = [(i + 0.5) * row["window"] for i in range(len(row["window_rmse"]))]
        ax.plot(centres, row["window_rmse"], marker="o", label=f"stream, batch {row['batch_size']} (prequential)")
    offline = result["offline"]
    centres = [offline["test_from"] + (i + 0.5) * offline["window"] for i in range(len(offline["window_rmse"]))]
    ax.plot(centres, offline["window_rmse"], marker="s", color="black",
            label=f"offline, {offline['epochs']} epochs on the first {PAST:.0%} (frozen)")
    for (label, value), style in zip(REFERENCES.items(), (":", "--")):
        ax.axhline(value, color="grey", ls=style, lw=1, label=f"{label}: {value} (whole pass)")
    ax.set(xlabel="events (ratings in time order)", ylabel="RMSE", title="MovieLens-100k: RMSE per window of events")
    ax.legend(fontsize=8)
    save_figure(figure, path)


def format_recipe_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    offline = result["offline"]
    test_label = f"RMSE on the last {1 - VALIDATION:.0%}"
    lines = [f"| model | prequential RMSE, whole pass | {test_label} | events/s |", "| --- | --- | --- | --- |"]
    for row in result["stream"] + result.get("sparse", []):
        kind = "SparseAdam, sparse embeddings" if row.get("sparse") else "Adam"
        lines.append(f"| stream, batch {row['batch_size']}, {kind}, lr {row['lr']:g} | {row['preq_rmse']:.3f} | "
                     f"{row['test_rmse']:.3f} (prequential) | {row['events_per_s']:,.0f} |")
    lines.append(f"| offline, batch {offline['batch_size']}, {offline['epochs']} epochs on the first {PAST:.0%} | - | "
                 f"{offline['test_rmse']:.3f} (frozen) | - |")
    for label, value in REFERENCES.items():
        lines.append(f"| {label} | {value} | - | - |")
    speed = result.get("sparse_speed", [])
    if speed:
        lines += ["", f"Sparse against dense embedding gradients, from a list of the first {speed[0]['events']:,} "
                      f"ratings, median of {speed[0]['repeats']} interleaved runs:", "",
                  "| embedding rows | batch | dense (Adam) events/s | sparse (SparseAdam) events/s | sparse / dense |",
                  "| --- | --- | --- | --- | --- |"]
        for row in speed:
            rows = f"{943 * row['table_scale']:,} users + {1682 * row['table_scale']:,} items"
            lines.append(f"| {rows} | {row['batch_size']} | {row['dense_events_per_s']:,.0f} | "
                         f"{row['sparse_events_per_s']:,.0f} | {row['sparse_over_dense']:.2f} |")
    return "\n".join(lines)
