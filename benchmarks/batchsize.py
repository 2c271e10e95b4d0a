"""batch_size="auto" and "adaptive" against a sweep of fixed batch sizes, on three workloads.

For each workload every run starts from the same initial weights and trains until a target
validation metric is reached (checked every ``eval_every`` of an epoch), or a budget of epochs
runs out. A fixed batch size B gets the learning rate ``scale_lr(base_lr, base_batch, B, rule)``;
"auto" and "adaptive" get the same base lr and rule and choose their batch themselves, their
probe counted in their time. Times exclude the validation checks (the same for all runs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchfit.errors import NonFiniteLossError
from batchfit.measure.lr import scale_lr
from batchfit.models import cnn, mlp
from batchfit.train.callbacks import Callback
from batchfit.train.trainer import Trainer


@dataclass
class Workload:
    """A model, data, optimizer and a validation target."""

    name: str
    make_model: Callable[[], torch.nn.Module]
    make_optimizer: Callable[[torch.nn.Module, float], torch.optim.Optimizer]
    loss_fn: Callable[..., torch.Tensor]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    metric: str  # key of Trainer.evaluate
    target: float
    maximize: bool
    base_lr: float
    base_batch: int
    rule: str
    max_epochs: int


class _Watch(Callback):
    """Evaluates on the validation set every so many samples; stops at the target."""

    def __init__(self, workload: Workload, every_samples: int, deadline: float = math.inf) -> None:
        self.workload, self.every, self.deadline = workload, every_samples, deadline
        self.capped = False
        self.next_check = every_samples
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.steps: int | None = None
        self.seconds: float | None = None
        self.best = -math.inf if workload.maximize else math.inf

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["samples"] < self.next_check:
            return
        if time.perf_counter() - self.start - self.eval_seconds > self.deadline:
            # Already far slower than a run that reached the target: it cannot be the best, so its
            # exact time does not matter and the table is spared minutes of a hopeless run.
            self.capped = trainer.stop_training = True
            return
        self.next_check += self.every
        begin = time.perf_counter()
        value = trainer.evaluate(self.workload.val)[self.workload.metric]
        self.eval_seconds += time.perf_counter() - begin
        self.best = max(self.best, value) if self.workload.maximize else min(self.best, value)
        reached = value >= self.workload.target if self.workload.maximize else value <= self.workload.target
        if reached:
            self.steps = record["step"]
            self.seconds = time.perf_counter() - self.start - self.eval_seconds
            trainer.stop_training = True


def _run(workload: Workload, batch_size: int | str, eval_every: float, seed: int,
         deadline: float = math.inf) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = workload.make_model()
    if isinstance(batch_size, int):
        lr = scale_lr(workload.base_lr, workload.base_batch, batch_size, workload.rule)
        options: dict[str, Any] = {}
    else:
        lr = workload.base_lr
        options = {"lr_scaling": workload.rule, "base_batch_size": workload.base_batch}
    watch = _Watch(workload, max(1, int(eval_every * len(workload.train[1]))), deadline)
    trainer = Trainer(model, workload.loss_fn, workload.make_optimizer(model, lr), batch_size=batch_size,
                      progress=False, seed=seed, callbacks=[watch], device="cpu", **options)
    diverged = False
    try:
        trainer.fit(workload.train, epochs=workload.max_epochs)
    except NonFiniteLossError:
        diverged = True  # the lr the rule gives is too large for this batch: never reaches the target
    chosen = [e["batch_size"] for e in trainer.history.events if e["kind"] == "batch_size"]
    probe_seconds = sum(e.get("probe_seconds", 0.0) for e in trainer.history.events)
    return {"workload": workload.name, "batch_size": batch_size, "lr": lr, "steps": watch.steps,
            "seconds": watch.seconds, "best": watch.best, "diverged": diverged,
            "chosen": chosen or [batch_size], "probe_seconds": probe_seconds, "capped": watch.capped}


def digits_workload() -> Workload:
    """The demo's CNN on scikit-learn's digits; target: 95 % validation accuracy."""
    from batchfit.demo import load_digits_split

    x_train, x_test, y_train, y_test = load_digits_split()
    return Workload("digits CNN", lambda: cnn(), lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr),
                    F.cross_entropy, (x_train, y_train), (x_test, y_test), "accuracy", 0.95, True,
                    2e-3, 32, "sqrt", 40)


def regression_workload(noise: float = 0.5, seed: int = 0) -> Workload:
    """Linear targets plus Gaussian noise of known variance; target: validation MSE within 20 % of it."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((32, 1)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, 32)).astype(np.float32)
        return x, (x @ weights + noise * rng.standard_normal((n, 1))).astype(np.float32)

    return Workload("noisy regression", lambda: mlp(32, 1, hidden=(64,)),
                    lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), F.mse_loss,
                    draw(16_384), draw(4_096), "loss", 1.2 * noise**2, False, 0.01, 32, "linear", 40)


def classification_workload(seed: int = 0) -> Workload:
    """A harder synthetic task: 10 classes, 40 features with interactions; target 85 % accuracy."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=24_000, n_features=40, n_informative=20, n_redundant=10, n_classes=10,
                               n_clusters_per_class=2, class_sep=1.5, flip_y=0.02, random_state=seed)
    x, y = x.astype(np.float32), y.astype(np.int64)
    return Workload("synthetic 10-class", lambda: mlp(40, 10, hidden=(128, 128)),
                    lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), F.cross_entropy,
                    (x[:20_000], y[:20_000]), (x[20_000:], y[20_000:]), "accuracy", 0.85, True,
                    0.02, 32, "linear", 40)


CAP = 20.0  # a trial stops once it has taken this many times the fastest fixed-batch trial that reached the target


def batch_size_table(quick: bool = False, repeats: int = 1, seed: int = 0,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Rows per workload and mode: steps and seconds to target, and the ratio to the best fixed batch.

    Every repeat runs every mode once from the same seed, in an order rotated from one repeat to
    the next, after one untimed warm-up of each workload (the first run in a process pays for
    allocations and kernels the later ones reuse). Seconds are medians over repeats; the ratio
    to the best fixed batch (the fixed size with the least median) is the ratio of the medians.
    A trial stops once it has taken ``CAP`` times the fastest fixed-batch trial of its workload
    that reached the target (it is "not reached" then). A progress bar counts the trials.
    """
    from tqdm.auto import tqdm

    workloads = [digits_workload(), regression_workload(), classification_workload()]
    sizes = [16, 32, 64, 128, 256] if quick else [16, 32, 64, 128, 256, 512]
    rows = []
    bar = tqdm(total=len(workloads) * (len(sizes) + 2) * repeats, desc="batch-size table", unit="trial",
               disable=not progress)
    for workload in workloads:
        modes: list[int | str] = [*sizes, "auto", "adaptive"]
        _run(replace(workload, max_epochs=1), "auto", 0.25, seed)  # warm-up, not counted
        by_mode: dict[int | str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        fastest = math.inf
        for r in range(repeats):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                trial = _run(workload, mode, 0.25, seed + r, CAP * fastest)
                by_mode[mode].append(trial)
                if trial["seconds"] is not None and isinstance(mode, int):
                    fastest = min(fastest, trial["seconds"])
                bar.set_postfix_str(f"{workload.name}, {mode}", refresh=False)
                bar.update()
        runs = [_summary(trials) for trials in by_mode.values()]
        medians = {mode: _median([t["seconds"] for t in by_mode[mode]]) for mode in sizes}
        fixed = [mode for mode in sizes if medians[mode] is not None]
        best = min(fixed, key=lambda mode: medians[mode] or math.inf) if fixed else None
        best_seconds = medians[best] if best is not None else None
        for run, trials in zip(runs, by_mode.values()):
            run["best_fixed"] = best
            run["ratio_to_best_fixed"] = run["ratio_without_probe"] = None
            if best_seconds is None or run["seconds"] is None:
                continue
            run["ratio_to_best_fixed"] = run["seconds"] / best_seconds
            # The probe's cost apart: how good the choice itself was.
            without = _median([None if t["seconds"] is None else t["seconds"] - t["probe_seconds"] for t in trials])
            run["ratio_without_probe"] = None if without is None else without / best_seconds
        rows += runs
    bar.close()
    return rows


def _median(values: list[float | None]) -> float | None:
    """The median, a missed target counting as slower than any time (``None`` when that is the median)."""
    median = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(median) else median


def _summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's row: medians over its trials, a trial that missed the target counting as infinitely slow."""
    seconds, steps = _median([t["seconds"] for t in trials]), _median([t["steps"] for t in trials])
    return {**trials[0], "capped": any(t["capped"] for t in trials), "diverged": all(t["diverged"] for t in trials),
            "missed": sum(t["seconds"] is None for t in trials),
            "seconds": seconds, "steps": None if steps is None else int(steps),
            "seconds_per_trial": [t["seconds"] for t in trials],
            "chosen_per_trial": [t["chosen"] for t in trials],
            "probe_seconds": statistics.median(t["probe_seconds"] for t in trials)}


def _choices(row: dict[str, Any]) -> str:
    """The batch sizes a mode chose, per trial when they differ: ``64`` or ``64, 128×2``."""
    counts = Counter("→".join(str(size) for size in chosen) for chosen in row.get("chosen_per_trial", [row["chosen"]]))
    return ", ".join(choice if count == 1 else f"{choice}×{count}" for choice, count in counts.items()) \
        if len(counts) > 1 else next(iter(counts))


def format_batch_size_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`batch_size_table` rows."""
    lines = ["| workload | batch size | lr | steps to target | seconds to target (probe) | × best fixed "
             "(without the probe) |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        size = row["batch_size"] if isinstance(row["batch_size"], int) else f"{row['batch_size']} ({_choices(row)})"
        missed = "diverged" if row.get("diverged") else f"not reached (stopped at {CAP:g}x the fastest)" \
            if row.get("capped") else "not reached"
        seconds = missed if row["seconds"] is None else f"{row['seconds']:.2f}"
        if row["seconds"] is not None and row.get("missed"):
            seconds += f" ({row['missed']} of {len(row['seconds_per_trial'])} trials missed)"
        if row.get("probe_seconds"):
            seconds += f" ({row['probe_seconds']:.2f})"
        ratio = "—" if row["ratio_to_best_fixed"] is None else f"{row['ratio_to_best_fixed']:.2f}"
        if row.get("probe_seconds") and row.get("ratio_without_probe") is not None:
            ratio += f" ({row['ratio_without_probe']:.2f})"
        lines.append(f"| {row['workload']} | {size} | {row['lr']:.4g} | {row['steps'] or '—'} | {seconds} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only batchsize [--quick] [--repeats N] [--json out.json]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--repeats", type=int, help="runs of every mode (default 5; --quick 1)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    rows = batch_size_table(quick=args.quick, repeats=repeats)
    print(f"batch sizes, time to target (medians of {repeats} run(s) a mode; "
          f"{torch.get_num_threads()} torch thread(s))")
    print(format_batch_size_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2, default=str)
