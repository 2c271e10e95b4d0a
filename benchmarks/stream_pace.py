"""The stream loop against a hand-written PyTorch loop doing the same maths, and the shipped recipe against river.

Pace: ``Trainer.fit(StreamSource(events))`` from a plain list of ``(user, item, rating)`` tuples against a
hand-written loop over the same list (the same model, optimizer, batches; collate with ``torch.tensor``, forward,
loss, backward, step, the loss summed on the device): samples/s of each and their ratio, the median of
interleaved repeats, at batch 1, 32 and 256. One torch thread.

River: the prequential RMSE and events/s over MovieLens-100k in time order of the shipped recipe
(:func:`batchfit.workloads.stream.recipe`) and of river's ``BiasedMF`` (its own recipe) in the same run; the
river row is skipped, with a note, when river is not installed.

Auto cap (``--auto-cap``): ``StreamSource(max_latency=..., max_batch_size="auto")`` against a fixed
``max_batch_size=512`` at batch 32, samples/s of each, the median of interleaved repeats and their ratio: the cost
of measuring the noise scale.

Run with ``python benchmarks/run.py --only stream_pace [--quick] [--auto-cap]``.
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
from batchfit.workloads.stream import MatrixFactorization, Recipe, load_movielens_100k, rmse_loss


def _events(columns: dict[str, np.ndarray], count: int) -> list[tuple[int, int, float]]:
    return list(zip(columns["user"][:count].tolist(), columns["item"][:count].tolist(),
                    columns["rating"][:count].tolist()))


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = MatrixFactorization(943, 1682, dim=16)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def stream_loop(events: list[tuple[int, int, float]], batch_size: int) -> float:
    """Samples/s of ``Trainer.fit`` on a ``StreamSource`` of the list (construction excluded)."""
    model, optimizer = _model_and_optimizer()
    trainer = Trainer(model, rmse_loss, optimizer, batch_size=batch_size, progress=False)
    start = time.perf_counter()
    trainer.fit(StreamSource(events))
    return len(events) / (time.perf_counter() - start)


def hand_loop(events: list[tuple[int, int, float]], batch_size: int) -> float:
    """Samples/s of the hand-written loop: the same batches, model, optimizer and loss."""
    model, optimizer = _model_and_optimizer()
    start = time.perf_counter()
    total = torch.zeros(())
    for first in range(0, len(events), batch_size):
        users, items, ratings = zip(*events[first : first + batch_size])
        user, item = torch.tensor(users), torch.tensor(items)
        rating = torch.tensor(ratings, dtype=torch.float64)
        loss = rmse_loss(model(user, item), rating)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.detach() * len(users)
    float(total)
    return len(events) / (time.perf_counter() - start)


def pace_table(columns: dict[str, np.ndarray], batch_sizes: Sequence[int] = (1, 32, 256), events: int = 20_000,
               repeats: int = 7) -> list[dict[str, Any]]:
    """Per batch size: the medians of ``repeats`` interleaved runs of each loop (the order alternating), and the
    median of the per-repeat ratios stream / hand."""
    torch.set_num_threads(1)
    rows = []
    for batch_size in batch_sizes:
        count = min(events, 4000) if batch_size == 1 else events
        data = _events(columns, count)
        stream, hand, ratios = [], [], []
        for repeat in range(repeats):
            pair = []
            for which in ((stream_loop, hand_loop) if repeat % 2 == 0 else (hand_loop, stream_loop)):
                pair.append((which, which(data, batch_size)))
            s = next(v for f, v in pair if f is stream_loop)
            h = next(v for f, v in pair if f is hand_loop)
            stream.append(s)
            hand.append(h)
            ratios.append(s / h)
        rows.append({"batch_size": batch_size, "events": count, "repeats": repeats,
                     "stream_per_s": float(np.median(stream)), "hand_per_s": float(np.median(hand)),
                     "ratio": float(np.median(ratios))})
    return rows


def format_pace_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"Stream loop against a hand-written loop (SGD, MF d=16, one torch thread), median of "
             f"{rows[0]['repeats']} interleaved runs:", "",
             "| batch | events | stream loop samples/s | hand loop samples/s | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['batch_size']} | {row['events']:,} | {row['stream_per_s']:,.0f} | "
                     f"{row['hand_per_s']:,.0f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def capped_loop(events: list[tuple[int, int, float]], batch_size: int, cap: int | str) -> float:
    """Samples/s of ``Trainer.fit`` on a ``StreamSource`` with ``max_latency`` and ``max_batch_size=cap``: a fixed
    cap, or ``"auto"`` (the noise scale measured every few steps). ``max_latency`` is a minute, so that the batch
    never grows and both runs do the same steps: what differs is the measurement alone."""
    model, optimizer = _model_and_optimizer()
    trainer = Trainer(model, rmse_loss, optimizer, batch_size=batch_size, progress=False)
    start = time.perf_counter()
    trainer.fit(StreamSource(events, max_latency=60.0, max_batch_size=cap))
    return len(events) / (time.perf_counter() - start)


def auto_cap_overhead(columns: dict[str, np.ndarray], batch_size: int = 32, events: int = 20_000,
                      repeats: int = 7) -> dict[str, Any]:
    """``max_batch_size="auto"`` against ``max_batch_size=512``: the medians of ``repeats`` interleaved runs of each
    (the order alternating) and the median of the per-repeat ratios auto / fixed."""
    torch.set_num_threads(1)
    data = _events(columns, events)
    fixed, auto, ratios = [], [], []
    for repeat in range(repeats):
        order = ((512, fixed), ("auto", auto)) if repeat % 2 == 0 else (("auto", auto), (512, fixed))
        for cap, rates in order:
            rates.append(capped_loop(data, batch_size, cap))
        ratios.append(auto[-1] / fixed[-1])
    return {"batch_size": batch_size, "events": events, "repeats": repeats, "fixed_per_s": float(np.median(fixed)),
            "auto_per_s": float(np.median(auto)), "ratio": float(np.median(ratios))}


def format_auto_cap(row: dict[str, Any]) -> str:
    return (f"max_batch_size=\"auto\" against 512 (batch {row['batch_size']}, {row['events']:,} events, SGD, MF d=16, "
            f"one torch thread, median of {row['repeats']} interleaved runs): {row['auto_per_s']:,.0f} against "
            f"{row['fixed_per_s']:,.0f} samples/s, ratio {row['ratio']:.3f}")


def shipped_recipe(columns: dict[str, np.ndarray], count: int | None = None, recipe: Recipe | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """The prequential RMSE and events/s of the recipe (its defaults) over the ratings in time order, the model's
    init drawn with ``seed``."""
    events = _events(columns, len(columns["user"]) if count is None else count)
    recipe = recipe or Recipe()
    model = recipe.model(seed=seed)
    trainer = Trainer(model, recipe.loss(model), recipe.optimizer(model), batch_size=recipe.batch_size,
                      progress=False)
    start = time.perf_counter()
    history = trainer.fit(StreamSource(events))
    seconds = time.perf_counter() - start
    return {"model": f"batchfit recipe, batch {recipe.batch_size}, {recipe.describe()}",
            "preq_rmse": math.sqrt(history.column("preq_loss")[-1]), "events_per_s": len(events) / seconds,
            "events": len(events)}


def river_biased_mf(columns: dict[str, np.ndarray], count: int | None = None, seed: int = 73) -> dict[str, Any] | None:
    """river's ``BiasedMF`` with the recipe of its documentation's example (n_factors 10, SGD 0.05 for the vectors
    and 0.025 for the biases, no l2: river's defaults, normal init 0.1 drawn with ``seed``), prequential:
    ``predict_one`` then ``learn_one`` for each rating in time order; ``None`` without river."""
    try:
        from river import optim, reco
    except ImportError:
        return None
    model = reco.BiasedMF(n_factors=10, bias_optimizer=optim.SGD(0.025), latent_optimizer=optim.SGD(0.05),
                          loss=optim.losses.Squared(), l2_bias=0.0, l2_latent=0.0,
                          weight_initializer=optim.initializers.Zeros(),
                          latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed))
    users = columns["user"].tolist()
    items = columns["item"].tolist()
    ratings = columns["rating"].tolist()
    n = len(users) if count is None else count
    squared = 0.0
    start = time.perf_counter()
    for user, item, rating in zip(users[:n], items[:n], ratings[:n]):
        predicted = model.predict_one(user, item)
        squared += (predicted - rating) ** 2
        model.learn_one(user, item, rating)
    seconds = time.perf_counter() - start
    return {"model": "river BiasedMF (its documented recipe)", "preq_rmse": math.sqrt(squared / n),
            "events_per_s": n / seconds, "events": n}


RIVER_RECIPES = (Recipe(), Recipe(batch_size=256), Recipe(batch_size=32), Recipe(batch_size=32, sequential=False),
                 Recipe(batch_size=8, sequential=False))


def river_table(columns: dict[str, np.ndarray], repeats: int = 5, count: int | None = None,
                recipes: Sequence[Recipe] = RIVER_RECIPES) -> dict[str, Any]:
    """Each recipe (the shipped one first) and river's ``BiasedMF``, run in turn ``repeats`` times (the order
    rotating), each repeat with its own init seed: the mean, lowest and highest RMSE over the seeds and the median
    events/s of each; ``river`` is ``None`` without river."""
    ours: list[list[dict[str, Any]]] = [[] for _ in recipes]
    theirs: list[Any] = []
    for repeat in range(repeats):
        runs = [lambda k=k, r=recipe, s=repeat: ours[k].append(shipped_recipe(columns, count, r, seed=s))
                for k, recipe in enumerate(recipes)]
        runs.append(lambda s=repeat: theirs.append(river_biased_mf(columns, count, seed=71 + s)))
        for run in runs[repeat % len(runs):] + runs[:repeat % len(runs)]:
            run()

    def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [r["preq_rmse"] for r in results]
        return {**results[0], "preq_rmse": float(np.mean(scores)), "preq_rmse_low": float(min(scores)),
                "preq_rmse_high": float(max(scores)),
                "events_per_s": float(np.median([r["events_per_s"] for r in results]))}

    rows: dict[str, Any] = {"recipes": [summary(r) for r in ours], "river": None, "repeats": repeats}
    rows["recipe"] = rows["recipes"][0]
    if theirs[0] is not None:
        rows["river"] = summary(theirs)
    return rows


def format_river_table(result: dict[str, Any]) -> str:
    river = result["river"]
    lines = [f"MovieLens-100k in time order, prequential (score, then train), {result['repeats']} interleaved runs, "
             f"each with its own init seed: the mean RMSE over the seeds (lowest-highest) and the median events/s:",
             "", "| model | prequential RMSE | events/s | / river |", "| --- | --- | --- | --- |"]

    def rmse(row: dict[str, Any]) -> str:
        return f"{row['preq_rmse']:.4f} ({row['preq_rmse_low']:.4f}-{row['preq_rmse_high']:.4f})"

    for row in result["recipes"]:
        ratio = f"{row['events_per_s'] / river['events_per_s']:.2f}" if river is not None else "-"
        lines.append(f"| {row['model']} | {rmse(row)} | {row['events_per_s']:,.0f} | {ratio} |")
    if river is None:
        lines.append("| river BiasedMF | skipped: river is not installed (pip install river) | - | - |")
    else:
        lines.append(f"| {river['model']} | {rmse(river)} | {river['events_per_s']:,.0f} | 1.00 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only stream_pace [--quick] [--json FILE]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer events and repeats (a rough check)")
    parser.add_argument("--repeats", type=int, help="interleaved runs of each loop (default 7; --quick 3)")
    parser.add_argument("--json", help="write every result to this JSON file")
    parser.add_argument("--auto-cap", action="store_true",
                        help='only the cost of max_batch_size="auto" against a fixed cap at batch 32')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    columns = load_movielens_100k()
    if args.auto_cap:
        row = auto_cap_overhead(columns, events=5_000 if args.quick else 20_000,
                                repeats=args.repeats or (3 if args.quick else 7))
        print(format_auto_cap(row), flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"auto_cap": row}, handle, indent=2)
        return
    repeats = args.repeats or (3 if args.quick else 7)
    pace = pace_table(columns, events=10_000 if args.quick else 100_000, repeats=repeats)
    print(format_pace_table(pace), "\n", flush=True)
    river = river_table(columns, repeats=1 if args.quick else 5, count=20_000 if args.quick else None)
    print(format_river_table(river), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"pace": pace, "river": river}, handle, indent=2)
