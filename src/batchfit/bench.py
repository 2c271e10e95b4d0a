"""``batchfit bench``: what batchfit's data path and training loop cost on this machine, against plain PyTorch.

Two groups of rows, each a ratio against a hand-written baseline run in the same process (interleaved
repeats, medians), so they hold on a machine with other load:

- batches from memory: the Batcher against ``DataLoader(TensorDataset, shuffle=True)`` and against a
  hand-written ``index_select`` gather into a preallocated buffer (200,000 x 64 float32 samples, batch 256);
- the training step: ``Trainer.fit`` (progress bar on) against a hand-written loop (``randperm`` +
  indexing + SGD) on an MLP 64-256-256-10 at batch 32 and 256.

These are the rows a user can check on their own machine with nothing but the library installed. Every
other benchmark (shards, prefetching, several processes, batch size, text, images, streams) needs data
on disk, services or pretrained models and lives in the repository's ``benchmarks/`` folder
(``python benchmarks/run.py``), which imports the helpers below.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from .data.batcher import Batcher
from .data.sources import ArraySource
from .train.trainer import Trainer


@dataclass
class Row:
    """One line of a benchmark table: a measured rate, its baseline and their ratio."""

    what: str
    baseline: str
    rate: float  # median of the measured thing, in `unit`
    baseline_rate: float
    ratio: float  # median of per-repeat ratios rate / baseline_rate
    target: str
    unit: str = "samples/s"

    @property
    def ok(self) -> bool | None:
        """Whether the ratio meets a target of the form '>= x' (None for other targets)."""
        if self.target.startswith(">="):
            return self.ratio >= float(self.target[2:])
        if self.target.startswith("<="):
            return self.ratio <= float(self.target[2:])
        return None


def interleaved(candidates: dict[str, Callable[[], int]], repeats: int,
                rotate: bool = False) -> dict[str, list[float]]:
    """Run each candidate ``repeats`` times, alternating, and return its rates (units per second).

    A candidate returns how many units (samples, bytes) it processed. Alternating the runs
    spreads machine noise evenly over all candidates; ``rotate`` also starts each repeat with the
    next candidate, for machines where the first run of a round is systematically faster (two
    identical candidates measured 1.05-1.18x apart on the 2 shared vCPUs of the development machine).
    """
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for repeat in range(repeats):
        shift = repeat % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            run = candidates[name]
            start = time.perf_counter()
            units = run()
            rates[name].append(units / (time.perf_counter() - start))
    return rates


def ratio_row(what: str, baseline: str, rates: dict[str, list[float]], target: str,
              unit: str = "samples/s") -> Row:
    """A row comparing ``rates[what]`` with ``rates[baseline]`` (median of paired ratios)."""
    ratios = [a / b for a, b in zip(rates[what], rates[baseline])]
    return Row(what, baseline, statistics.median(rates[what]), statistics.median(rates[baseline]),
               statistics.median(ratios), target, unit)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table."""
    header = ("measured", "baseline", "median", "baseline median", "ratio", "target", "")
    lines = [header]
    for row in rows:
        verdict = {True: "ok", False: "MISSED", None: ""}[row.ok]
        lines.append((row.what, row.baseline, f"{row.rate:,.0f} {row.unit}", f"{row.baseline_rate:,.0f}",
                      f"{row.ratio:.2f}x", row.target, verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def reference_data(num_samples: int, features: int = 64, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random float32 features and integer labels of the reference workload."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, features, generator=generator)
    y = torch.randint(0, classes, (num_samples,), generator=generator)
    return x, y


def data_path_rows(num_samples: int = 200_000, batch_size: int = 256, repeats: int = 5,
                   dataloader_batches: int = 200) -> list[Row]:
    """Batches from memory: batchfit vs DataLoader(TensorDataset) and a hand-written gather."""
    x, y = reference_data(num_samples)
    batcher = Batcher(ArraySource(x, y), batch_size=batch_size, shuffle=True, seed=0)

    def batchfit_epoch() -> int:
        count = 0
        for xb, _ in cast("Iterable[tuple[torch.Tensor, torch.Tensor]]", batcher):  # ArraySource(x, y): pairs
            count += xb.shape[0]
        return count

    x_buffer = torch.empty(batch_size, x.shape[1])
    y_buffer = torch.empty(batch_size, dtype=y.dtype)

    def hand_gather() -> int:
        order = torch.randperm(num_samples)
        count = 0
        for start in range(0, num_samples, batch_size):
            index = order[start : start + batch_size]
            n = index.shape[0]
            torch.index_select(x, 0, index, out=x_buffer[:n])
            torch.index_select(y, 0, index, out=y_buffer[:n])
            count += n
        return count

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)

    def dataloader_part() -> int:
        # A part of an epoch: the DataLoader fetches sample by sample, so a full epoch is slow.
        count = 0
        for i, (xb, _) in enumerate(loader):
            count += xb.shape[0]
            if i + 1 == dataloader_batches:
                break
        return count

    rates = interleaved({"batchfit Batcher": batchfit_epoch, "hand-written index_select": hand_gather,
                         "DataLoader(TensorDataset)": dataloader_part}, repeats)
    return [
        ratio_row("batchfit Batcher", "DataLoader(TensorDataset)", rates, ">=50"),
        ratio_row("batchfit Batcher", "hand-written index_select", rates, ">=0.8"),
    ]


def mlp(seed: int = 0) -> torch.nn.Module:
    """The reference MLP 64-256-256-10."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


def step_overhead_rows(batch_sizes: tuple[int, ...] = (32, 256), num_samples: int = 50_000,
                       repeats: int = 5) -> list[Row]:
    """Trainer.fit (progress bar on) vs a hand-written loop: randperm + indexing + SGD."""
    x, y = reference_data(num_samples)
    rows = []
    for batch_size in batch_sizes:
        hand_model, fit_model = mlp(), mlp()
        hand_opt = torch.optim.SGD(hand_model.parameters(), lr=0.01)
        fit_opt = torch.optim.SGD(fit_model.parameters(), lr=0.01)
        trainer = Trainer(fit_model, F.cross_entropy, fit_opt, batch_size=batch_size, device="cpu",
                          progress=True, seed=0)

        def hand_epoch(model: torch.nn.Module = hand_model, opt: torch.optim.Optimizer = hand_opt,
                       batch: int = batch_size) -> int:
            order = torch.randperm(num_samples)
            for start in range(0, num_samples, batch):
                index = order[start : start + batch]
                loss = F.cross_entropy(model(x[index]), y[index])
                opt.zero_grad()
                loss.backward()
                opt.step()
            return num_samples

        def fit_epoch(trainer: Trainer = trainer) -> int:
            # The bar is drawn (formatted and written) as usual, into a sink instead of the terminal.
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                trainer.fit((x, y), epochs=1)
            return num_samples

        hand_epoch(), fit_epoch()  # warm-up: first-call allocations and lazy imports
        rates = interleaved({f"Trainer.fit, batch {batch_size}": fit_epoch,
                             f"hand-written loop, batch {batch_size}": hand_epoch}, repeats)
        rows.append(ratio_row(f"Trainer.fit, batch {batch_size}", f"hand-written loop, batch {batch_size}",
                              rates, ">=0.97"))
    return rows


def run_bench(quick: bool = False, only: str | None = None) -> str:
    """Both groups of rows (or the one ``only`` names: ``"data"``, ``"train"``) as one table, headed by the
    machine and torch's thread count."""
    rows: list[Row] = []
    if only in (None, "data"):
        print("batchfit bench: batches from memory", file=sys.stderr, flush=True)
        rows += data_path_rows(num_samples=50_000 if quick else 200_000, repeats=3 if quick else 7)
    if only in (None, "train"):
        print("batchfit bench: the training step", file=sys.stderr, flush=True)
        rows += step_overhead_rows(num_samples=10_000 if quick else 50_000, repeats=3 if quick else 9)
    return f"{bench_header('batchfit bench', quick)}\n{format_table(rows)}"


def bench_header(title: str, quick: bool) -> str:
    """A table's first line: the run's size and the machine, torch threads included (they change every ratio)."""
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
               f"torch {torch.__version__}")
    return f"{title} ({'quick' if quick else 'full'}; {machine}); medians of interleaved repeats"
