"""Timing helpers shared by the benchmarks: interleaved repeats, medians, a printed table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


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


def run_child_task(spec: str, tasks: dict[str, Callable[..., Any]]) -> None:
    """Run the task a benchmark's ``--child`` argument names (JSON ``[name, *args]``) in this fresh
    process and print its result as JSON for the parent to read."""
    name, *args = json.loads(spec)
    print(json.dumps(tasks[name](*args)))


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
