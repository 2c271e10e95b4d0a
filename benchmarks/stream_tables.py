"""Hashed tables for ids never seen, measured: MovieLens-100k in time order through the shipped recipe.

Each run trains the shipped :class:`~batchfit.workloads.stream.Recipe` (plain SGD, per-event steps, batch 1024,
:class:`~batchfit.workloads.stream.SequentialMSE`, which treats ids that share a bucket as sharing their rows)
with ``Trainer.fit(StreamSource(events))`` over the ratings in time order, once, test-then-train, and reports the
prequential RMSE. The model is the recipe's :class:`~batchfit.workloads.stream.MatrixFactorization` with exact
tables (943 users x 1,682 items: every id known in advance, the reference) or with hashed tables of 1x, 2x and 4x
as many buckets as ids, plain, with ``min_count=2`` (an id trains its own rows from its second rating; a shared
cold row before), with ``expire_after`` (a bucket unseen for that many steps starts again from the init) and with
both. Each row also gives the collision rate of the user and item tables, the fraction of lookups that went to
the cold row, the rows reset by expiry and events/s (one run each, one torch thread: a rough figure on a busy
machine).

Run with ``python benchmarks/run.py --only stream_tables [--quick] [--json FILE]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from batchfit.data.streams import StreamSource
from batchfit.train.trainer import Trainer
from batchfit.workloads.stream import HashedEmbedding, Recipe, load_movielens_100k

USERS, ITEMS = 943, 1682
# (label, options of the hashed tables)
# expire_after counts training steps: at the recipe's batch of 1,024, 8 steps are 8,192 events, 32 are 32,768.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("hashed", {}),
    ("min_count 2", {"min_count": 2}),
    ("expire_after 8", {"expire_after": 8}),
    ("expire_after 32", {"expire_after": 32}),
    ("min_count 2, expire_after 8", {"min_count": 2, "expire_after": 8}),
)


def run_once(events: list[tuple[int, int, float]], scale: int | None, options: dict[str, Any],
             recipe: Recipe | None = None) -> dict[str, Any]:
    """One prequential pass of the recipe; ``scale`` ``None``: exact tables, else hashed tables of ``scale`` times
    as many buckets as ids, with ``options`` (``min_count``, ``expire_after``)."""
    recipe = recipe or Recipe()
    if scale is None:
        model = recipe.model()
    else:
        model = recipe.model(USERS * scale, ITEMS * scale, hashed=True, **options)
    trainer = Trainer(model, recipe.loss(model), recipe.optimizer(model), batch_size=recipe.batch_size, progress=False)
    start = time.perf_counter()
    history = trainer.fit(StreamSource(events))
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"scale": scale, "options": dict(options), "events": len(events),
                           "preq_rmse": math.sqrt(history.column("preq_loss")[-1]),
                           "events_per_s": len(events) / seconds}
    for name in ("user_vectors", "item_vectors"):
        table = getattr(model, name)
        if isinstance(table, HashedEmbedding):
            stats = table.stats()
            who = name.split("_")[0]
            row[f"{who}_collision_rate"] = stats["collision_rate"]
            row[f"{who}_cold_rate"] = stats.get("cold_rate", 0.0)
            row[f"{who}_expired"] = stats.get("expired", 0)
    return row


def tables_grid(columns: dict[str, np.ndarray], scales: Sequence[int] = (1, 2, 4), count: int | None = None,
                variants: Sequence[tuple[str, dict[str, Any]]] = VARIANTS) -> list[dict[str, Any]]:
    """The exact tables, then every scale x variant, over the first ``count`` ratings (all by default)."""
    n = len(columns["user"]) if count is None else count
    events = list(zip(columns["user"][:n].tolist(), columns["item"][:n].tolist(), columns["rating"][:n].tolist()))
    rows = [{**run_once(events, None, {}), "label": "exact tables (943 x 1,682)"}]
    for scale in scales:
        for label, options in variants:
            rows.append({**run_once(events, scale, options), "label": f"{scale}x buckets, {label}"})
    return rows


def format_tables(rows: list[dict[str, Any]]) -> str:
    """The grid as a Markdown table."""
    recipe = Recipe()
    lines = [f"MovieLens-100k in time order ({rows[0]['events']:,} ratings), prequential, the shipped recipe "
             f"(batch {recipe.batch_size}, {recipe.describe()}), one run each, one torch thread:", "",
             "| tables | prequential RMSE | collision rate users / items | cold lookups users / items | "
             "rows expired users / items | events/s |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["scale"] is None:
            extra = "- | - | -"
        else:
            extra = (f"{row['user_collision_rate']:.3f} / {row['item_collision_rate']:.3f} | "
                     f"{row['user_cold_rate']:.3f} / {row['item_cold_rate']:.3f} | "
                     f"{row['user_expired']:,} / {row['item_expired']:,}")
        lines.append(f"| {row['label']} | {row['preq_rmse']:.4f} | {extra} | {row['events_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only stream_tables [--quick] [--json FILE]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the first 20,000 ratings only (a rough check)")
    parser.add_argument("--json", help="write every row to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = tables_grid(load_movielens_100k(), count=20_000 if args.quick else None)
    print(format_tables(rows), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
