"""``batchfit bench``: every benchmark group, one table."""

from __future__ import annotations

import platform
import sys

import torch

from .common import Row, format_table


def run_bench(quick: bool = False, only: str | None = None) -> str:
    """Run the benchmark groups (``only``: "data", "train", "shards", "distributed") and format one table.

    ``only="batchsize"`` runs the batch-size table instead (time to a target for fixed batch sizes,
    ``"auto"`` and ``"adaptive"``; not part of the default run, it takes minutes).
    """
    from .core import data_path_rows, step_overhead_rows

    if only == "batchsize":
        from .batchsize import batch_size_table, format_batch_size_table

        repeats = 1 if quick else 5
        return f"batchfit bench --only batchsize (medians of {repeats} runs a mode)\n" \
            + format_batch_size_table(batch_size_table(quick=quick, repeats=repeats))

    rows: list[Row] = []
    groups = [g for g in ("data", "train", "shards", "distributed") if only in (None, g)]

    def starting(group: str) -> None:  # long runs say where they are
        print(f"batchfit bench: {group} ({groups.index(group) + 1}/{len(groups)})", file=sys.stderr, flush=True)

    if only in (None, "data"):
        starting("data")
        from .prefetch import prefetch_rows

        rows += data_path_rows(num_samples=50_000 if quick else 200_000, repeats=3 if quick else 7)
        rows += prefetch_rows(quick=quick)
    if only in (None, "train"):
        starting("train")
        rows += step_overhead_rows(num_samples=10_000 if quick else 50_000, repeats=3 if quick else 9)
    if only in (None, "shards"):
        starting("shards")
        from .shards import run as shard_rows
        from .shuffle import run as shuffle_rows

        rows += [Row(**row) for row in shard_rows(quick=quick)]
        rows += [Row(**row) for row in shuffle_rows(quick=quick)]
    if only in (None, "distributed"):
        starting("distributed")
        from .distributed import distributed_rows

        rows += distributed_rows(quick=quick)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    return f"batchfit bench ({'quick' if quick else 'full'}; {machine}); medians of interleaved repeats\n" \
           + format_table(rows)
