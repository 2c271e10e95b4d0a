"""Streams, measured: events/s through the trainer (producer -> Redis -> batch -> update) and the latency from an
event's ``XADD`` to the first published snapshot that includes it, on MovieLens-100k replayed in time order.

Run with ``python benchmarks/run.py --only stream`` (it starts a ``redis-server`` of its own). One torch thread;
every setting runs on a fresh stream of the same redis-server, so the settings are compared side by side.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchfit.data.redis_streams import RedisStream, id_time
from batchfit.data.streams import StreamSource
from batchfit.train.callbacks.snapshots import PublishSnapshots
from batchfit.train.trainer import Trainer
from batchfit.workloads.stream import ML100K_FIELDS, MatrixFactorization, load_movielens_100k, replay, rmse_loss

from .common import ROOT


def temporary_redis_server(folder: str | Path | None = None) -> contextlib.AbstractContextManager[str]:
    """The tests' throw-away ``redis-server`` (``tests/redis_server.py``): a free port, stopped on exit."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.append(str(ROOT / "tests"))
    from redis_server import temporary_redis_server as start

    return start(folder)


def _trainer(batch_size: int, lr: float, callbacks: Sequence[Any] = (), **options: Any) -> Trainer:
    model = MatrixFactorization(943, 1682, dim=16)
    return Trainer(model, rmse_loss, torch.optim.Adam(model.parameters(), lr=lr), batch_size=batch_size,
                   progress=False, callbacks=list(callbacks), **options)


def _source(url: str, stream: str, max_latency: float | None, idle: float) -> StreamSource:
    consumer = RedisStream(url, stream, group="bench", fields=ML100K_FIELDS, idle_timeout=idle)
    return StreamSource(consumer, max_latency=max_latency)


def throughput(url: str, columns: dict[str, np.ndarray], stream: str, batch_size: int, events: int,
               checkpoint_every: int | None = None, folder: str | None = None, lr: float = 0.01) -> dict[str, Any]:
    """Events/s of a trainer draining ``events`` events that are already in Redis (from its first step to its last)."""
    import redis

    client = redis.Redis.from_url(url)
    replay(client, stream, columns, limit=events, chunk=1000)
    client.close()
    options: dict[str, Any] = {}
    if checkpoint_every is not None:
        options = {"checkpoint_dir": folder, "checkpoint_every": checkpoint_every}
    trainer = _trainer(batch_size, lr, **options)
    history = trainer.fit(_source(url, stream, None, idle=0.3))
    seconds = history.column("seconds")
    span = max(seconds[-1] - seconds[0], 1e-9)  # from the first step to the last
    return {"batch_size": batch_size, "checkpoint_every": checkpoint_every, "events": trainer.samples_seen,
            "events_per_s": (trainer.samples_seen - batch_size) / span, "seconds_per_step": span / (trainer.step - 1),
            "preq_rmse": math.sqrt(history.column("preq_loss")[-1])}


def latency(url: str, columns: dict[str, np.ndarray], stream: str, batch_size: int, max_latency: float,
            rate: float, events: int, folder: str, lr: float = 0.01, snapshot_seconds: float = 0.05) -> dict[str, Any]:
    """p50/p99 seconds from each event's ``XADD`` to the first snapshot that includes it, at ``rate`` events/s.

    A snapshot (fsynced file and pointer) is published after the first step that ends ``snapshot_seconds``
    after the previous one, so the latency is that of the whole path: wait for the batch to close, train,
    wait for the next publication, write. Events are delivered in stream order to the one consumer, so
    event ``i`` is in the first snapshot of at least ``i + 1`` samples.
    """
    import redis

    client = redis.Redis.from_url(url)
    ids: list[str] = []
    producer = threading.Thread(target=lambda: ids.extend(replay(client, stream, columns, rate=rate, chunk=10,
                                                                 limit=events)))
    snapshots = PublishSnapshots(folder, every_seconds=snapshot_seconds, keep=2)
    trainer = _trainer(batch_size, lr, callbacks=[snapshots])
    source = _source(url, stream, max_latency, idle=1.0)
    producer.start()
    history = trainer.fit(source)
    producer.join()
    client.close()
    published = [(info["samples"], info["time"]) for info in snapshots.published]
    samples = np.array([s for s, _ in published])
    times = np.array([t for _, t in published])
    first = np.searchsorted(samples, np.arange(1, len(ids) + 1))  # the first snapshot holding event i
    added = np.array([id_time(i) for i in ids])
    waits = times[np.minimum(first, len(times) - 1)] - added
    cut_on_time = sum(1 for size in history.column("batch_size") if size < batch_size)
    return {"batch_size": batch_size, "max_latency": max_latency, "rate": rate, "events": len(ids),
            "snapshot_seconds": snapshot_seconds,
            "p50_ms": 1000 * float(np.percentile(waits, 50)), "p99_ms": 1000 * float(np.percentile(waits, 99)),
            "steps": trainer.step, "partial_batches": cut_on_time}


def stream_table(events: int = 10000, rate: float = 5000.0, batch_sizes: Sequence[int] = (32, 256),
                 max_latencies: Sequence[float] = (0.01, 0.1), repeats: int = 3) -> list[dict[str, Any]]:
    """Every measurement of the stream benchmark, one dict each: the median over ``repeats`` runs.

    The settings of a repeat run one after another, each repeat in an order rotated by one, so that a
    slow phase of a busy machine does not fall on the same setting every time.
    """
    torch.set_num_threads(1)
    columns = load_movielens_100k()
    settings: list[tuple[Any, ...]] = [("throughput", b, every) for b in batch_sizes for every in (None, 10, 1)]
    settings += [("latency", b, latency) for b in batch_sizes for latency in max_latencies]
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as tmp, temporary_redis_server(Path(tmp) / "redis") as url:
        count = 0
        for repeat in range(repeats):
            for setting in settings[repeat % len(settings):] + settings[: repeat % len(settings)]:
                count += 1
                kind, batch_size, value = setting
                if kind == "throughput":
                    row = throughput(url, columns, f"bench-{count}", batch_size, events, value,
                                     str(Path(tmp) / f"ckpt-{count}"))
                else:
                    row = latency(url, columns, f"bench-{count}", batch_size, value, rate, events,
                                  str(Path(tmp) / f"snap-{count}"))
                runs[setting].append(row)
    return [_median_row(setting[0], runs[setting]) for setting in settings]


def _median_row(kind: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first row with every number it measured replaced by the median over ``rows`` (and their count)."""
    measured = ("events_per_s", "seconds_per_step", "p50_ms", "p99_ms", "partial_batches", "steps")
    merged = {"kind": kind, **rows[0], "repeats": len(rows)}
    for key in measured:
        if key in rows[0]:
            merged[key] = float(np.median([row[key] for row in rows]))
    return merged


def checkpoint_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: the time a step takes without checkpoints and what one checkpoint + ack adds to it
    (from the medians of the runs that checkpoint every step and never)."""
    costs = []
    for row in rows:
        if row["kind"] == "throughput" and row["checkpoint_every"] == 1:
            base = next(r for r in rows if r["kind"] == "throughput" and r["batch_size"] == row["batch_size"]
                        and r["checkpoint_every"] is None)
            costs.append({"batch_size": row["batch_size"], "step_ms": 1000 * base["seconds_per_step"],
                          "checkpoint_ack_ms": 1000 * (row["seconds_per_step"] - base["seconds_per_step"])})
    return costs


def format_stream_table(rows: list[dict[str, Any]]) -> str:
    """The rows as three Markdown tables."""
    repeats = rows[0].get("repeats", 1) if rows else 1
    lines = [f"Medians of {repeats} runs each.", "", "| batch | checkpoint every | events/s | ms per step | "
             "prequential RMSE |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["kind"] == "throughput":
            every = "no checkpoint" if row["checkpoint_every"] is None else f"{row['checkpoint_every']} steps"
            lines.append(f"| {row['batch_size']} | {every} | {row['events_per_s']:,.0f} | "
                         f"{1000 * row['seconds_per_step']:.2f} | {row['preq_rmse']:.3f} |")
    lines += ["", "| batch | ms per step without checkpoints | one checkpoint + XACK adds |", "| --- | --- | --- |"]
    for cost in checkpoint_costs(rows):
        lines.append(f"| {cost['batch_size']} | {cost['step_ms']:.2f} ms | {cost['checkpoint_ack_ms']:.2f} ms |")
    lines += ["", "| batch | max_latency | producer rate | snapshot every | XADD -> snapshot p50 | p99 | "
              "batches cut on time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["kind"] == "latency":
            lines.append(f"| {row['batch_size']} | {row['max_latency'] * 1000:g} ms | {row['rate']:,.0f} ev/s | "
                         f"{row['snapshot_seconds'] * 1000:g} ms | "
                         f"{row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms | "
                         f"{row['partial_batches']:.0f} of {row['steps']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only stream [options]``: the recipe's RMSE, then events/s and lag through Redis."""
    import argparse
    import json

    from .stream_recipe import format_recipe_table, recipe_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 events through Redis, one run a setting")
    parser.add_argument("--events", type=int, help="events a throughput run drains (default 10,000; --quick 2,000)")
    parser.add_argument("--rate", type=float, default=5000.0, help="the producer's events/s in the latency runs")
    parser.add_argument("--repeats", type=int, help="runs of each setting (default 3; --quick 1)")
    parser.add_argument("--json", help="write every result to this JSON file")
    parser.add_argument("--plot", help="PNG of the prequential RMSE per window against the offline model")
    parser.add_argument("--skip-recipe", action="store_true", help="only the rows through Redis")
    parser.add_argument("--catch-up", action="store_true", help="only the lag at 5k, 10k and 20k events/s, without "
                        "and with max_batch_size=512 (batch 32, max_latency 50 ms)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    if args.catch_up:
        results["catch_up"] = catch_up_table(events=args.events or (5000 if args.quick else 20000))
        print(format_catch_up_table(results["catch_up"]))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)
        return
    if not args.skip_recipe:
        results["recipe"] = recipe_table(plot=args.plot)
        print(format_recipe_table(results["recipe"]), "\n", flush=True)
    rows = stream_table(events=args.events or (2000 if args.quick else 10000), rate=args.rate,
                        repeats=args.repeats or (1 if args.quick else 3))
    results["stream"] = rows
    results["checkpoint_costs"] = checkpoint_costs(rows)
    print(format_stream_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def catch_up(url: str, columns: dict[str, np.ndarray], stream: str, rate: float, events: int,
             max_batch_size: int | None, batch_size: int = 32, max_latency: float = 0.05) -> dict[str, Any]:
    """The lag from an event's ``XADD`` to the end of the step that trained on it, with a producer at ``rate`` events
    per second, with or without ``max_batch_size`` (a trainer behind the stream grows its batch to catch up).

    Each step's ``lag`` column is that of its oldest event; every event of the step is counted with it (an
    upper bound by at most the batch's fill time). Also: the producer's true events/s (from the stream ids'
    times) and the trainer's (events over the span of its steps)."""
    import redis

    client = redis.Redis.from_url(url)
    ids: list[str] = []
    producer = threading.Thread(target=lambda: ids.extend(replay(client, stream, columns, rate=rate, chunk=10,
                                                                 limit=events)))
    trainer = _trainer(batch_size, 0.01)
    consumer = RedisStream(url, stream, group="bench", fields=ML100K_FIELDS, idle_timeout=1.0)
    source = StreamSource(consumer, max_latency=max_latency, max_batch_size=max_batch_size)
    producer.start()
    history = trainer.fit(source)
    producer.join()
    client.close()
    sizes = np.array(history.column("batch_size"), dtype=int)
    lags = np.repeat(np.array(history.column("lag")), sizes)
    produced = [id_time(i) for i in ids]
    seconds = history.column("seconds")
    return {"rate": rate, "max_batch_size": max_batch_size, "batch_size": batch_size, "max_latency": max_latency,
            "events": len(ids), "true_rate": (len(ids) - 1) / max(produced[-1] - produced[0], 1e-9),
            "trained_per_s": trainer.samples_seen / max(seconds[-1] - seconds[0], 1e-9),
            "p50_ms": 1000 * float(np.percentile(lags, 50)), "p99_ms": 1000 * float(np.percentile(lags, 99)),
            "steps": trainer.step, "largest_batch": int(sizes.max()),
            "preq_rmse": math.sqrt(history.column("preq_loss")[-1])}


def catch_up_table(rates: Sequence[float] = (5000.0, 10000.0, 20000.0), events: int = 20000,
                   caps: Sequence[int | None] = (None, 512)) -> list[dict[str, Any]]:
    """:func:`catch_up` at each producer rate, without and with ``max_batch_size``, on one redis-server."""
    torch.set_num_threads(1)
    columns = load_movielens_100k()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, temporary_redis_server(Path(tmp) / "redis") as url:
        for count, (rate, cap) in enumerate((r, c) for r in rates for c in caps):
            rows.append(catch_up(url, columns, f"catch-{count}", rate, events, cap))
    return rows


def format_catch_up_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| producer rate asked | true rate | max_batch_size | trained events/s | largest batch | lag p50 "
             "| lag p99 | prequential RMSE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cap = "-" if row["max_batch_size"] is None else str(row["max_batch_size"])
        lines.append(f"| {row['rate']:,.0f} ev/s | {row['true_rate']:,.0f} ev/s | {cap} | "
                     f"{row['trained_per_s']:,.0f} | "
                     f"{row['largest_batch']} | {row['p50_ms']:,.0f} ms | {row['p99_ms']:,.0f} ms | "
                     f"{row['preq_rmse']:.3f} |")
    return "\n".join(lines)
