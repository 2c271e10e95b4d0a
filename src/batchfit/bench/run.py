"""``batchfit bench``: every benchmark group, one table."""

from __future__ import annotations

import platform

import torch

from .common import Row, format_table


def run_bench(quick: bool = False, only: str | None = None) -> str:
    """Run the benchmark groups (``only``: "data", "train", "shards", "distributed") and format one table."""
    from .core import data_path_rows, step_overhead_rows

    rows: list[Row] = []
    if only in (None, "data"):
        rows += data_path_rows(num_samples=50_000 if quick else 200_000, repeats=3 if quick else 7)
    if only in (None, "train"):
        rows += step_overhead_rows(num_samples=10_000 if quick else 50_000, repeats=3 if quick else 9)
    if only in (None, "shards"):
        from .shards import run as shard_rows

        rows += [Row(**row) for row in shard_rows(quick=quick)]
    if only in (None, "distributed"):
        from .distributed import distributed_rows

        rows += distributed_rows(quick=quick)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    return f"batchfit bench ({'quick' if quick else 'full'}; {machine}); medians of interleaved repeats\n" \
           + format_table(rows)
