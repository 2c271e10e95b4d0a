"""batchfit's benchmarks, one runner: every figure is a ratio against a baseline run side by side.

    python benchmarks/run.py [--quick] [--threads N]              the performance table (data, train, shards,
                                                                  shuffle, distributed), one table
    python benchmarks/run.py --only NAME [--quick] [OPTIONS...]   one benchmark; OPTIONS go to it
                                                                  (python benchmarks/run.py --only NAME --help)

Benchmarks (docs/benchmarks.md says what each measures, its baseline and its target):

    data          batches from memory against DataLoader and a hand-written gather, and prefetching
    train         Trainer.fit against a hand-written loop, MLP 64-256-256-10, batch 32 and 256
    shards        peak RSS from a 4 GiB shard folder, warm and cold reads, shuffle quality
    shuffle       a full shuffle past the mapping limit against a block shuffle
    prefetch      prefetch=2 against prefetch=0 (the prefetch rows of "data", with their own options)
    distributed   the same training on 1 and 2 processes, and against a hand-written DDP loop
    memory        per-rank memory (weights, gradients, AdamW state, RSS) and tokens/s, DDP against FSDP, SmolLM2-135M
    fsdp_pace     tokens/s of DDP and FSDP, Trainer.fit and hand-written loops, side by side (SmolLM2 widths, 4 layers)
    batchsize     fixed batch sizes against "auto" and "adaptive": time and steps to a target
    groundtruth   the batch-size ground truth: a batch x lr grid against tune() (docs/batch-size.md)
    images        images/s against a per-sample DataLoader pipeline, disk size, peak RSS
    text          padding and tokens/s by batching mode, against transformers.Trainer, memory
    stream        the MovieLens recipe's RMSE, events/s and lag through a redis-server of its own
    stream_pace   the stream loop against a hand-written loop (batch 1, 32, 256); the recipe against river
    stream_tables hashed tables for unseen ids on MovieLens-100k: buckets, min_count and expiry against exact tables
    stream_soak   1,000,000 events through Redis, the trainer killed every 20-40 s: lineage, RSS, checkpoint size, lag
    gpu_check     the CUDA path (FSDP over NCCL, pinned copies, bf16 autocast, the memory fit, out of memory): PASS/FAIL

Torch's CPU threads follow the rule of the ``batchfit`` command (``--threads``, else ``OMP_NUM_THREADS``,
else half the cores), printed in each table's first line; benchmarks that compare work on a busy machine
set one thread themselves and say so. ``batchfit bench`` (installed with the library) runs the "data"
and "train" rows without prefetching, for a machine with no checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout's own library and benchmarks first: the runner measures the code it sits next to.
for path in (ROOT / "src", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

TABLE = ("data", "train", "shards", "shuffle", "distributed")  # the default run, one table
# Each a module of this folder with its own main(argv): ``--only NAME`` passes the remaining options to it.
ON_THEIR_OWN = ("shards", "shuffle", "distributed", "memory", "fsdp_pace", "prefetch", "batchsize", "groundtruth",
                "images", "text", "stream", "stream_pace", "stream_tables", "stream_soak", "gpu_check")
NAMES = tuple(dict.fromkeys(TABLE + ON_THEIR_OWN))


def main(argv: list[str] | None = None) -> int:
    """Run the table, or the benchmark ``--only`` names; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--only", choices=NAMES, help="run one benchmark; the options after it go to it")
    parser.add_argument("--quick", action="store_true", help="smaller workloads and fewer repeats (a rough check)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the batchfit command's rule)")
    args, rest = parser.parse_known_args(argv)
    if args.only is None and ("-h" in rest or "--help" in rest):
        parser.print_help()
        return 0
    import torch

    from batchfit.cli import default_threads

    if args.only not in ON_THEIR_OWN and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (options of one benchmark go after --only NAME)")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        if args.only in ON_THEIR_OWN:
            return _on_its_own(args.only, ["--quick", *rest] if args.quick else rest)
        print(table(quick=args.quick, only=args.only))
        return 0
    finally:  # called from Python (a test), leave the caller's setting as it was
        torch.set_num_threads(threads)


def _on_its_own(name: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"benchmarks.{name}":
            raise
        print(f"benchmarks/run.py: benchmarks/{name}.py is not in this checkout", file=sys.stderr)
        return 2
    status = module.main(argv)
    return int(status or 0)


def table(quick: bool = False, only: str | None = None) -> str:
    """The performance table: every group of ``TABLE`` (or the one ``only`` names), one row a comparison."""
    from batchfit.bench import Row, bench_header, data_path_rows, format_table, step_overhead_rows

    from .prefetch import prefetch_rows

    groups: dict[str, Callable[[], list[Row]]] = {
        "data": lambda: data_path_rows(num_samples=50_000 if quick else 200_000, repeats=3 if quick else 7)
        + prefetch_rows(quick=quick),
        "train": lambda: step_overhead_rows(num_samples=10_000 if quick else 50_000, repeats=3 if quick else 9),
        "shards": lambda: [Row(**row) for row in _shard_rows(quick)],
        "shuffle": lambda: [Row(**row) for row in _shuffle_rows(quick)],
        "distributed": lambda: _distributed_rows(quick),
    }
    chosen = [name for name in groups if only in (None, name)]
    rows: list[Row] = []
    for number, name in enumerate(chosen, 1):  # long runs say where they are
        print(f"benchmarks/run.py: {name} ({number}/{len(chosen)})", file=sys.stderr, flush=True)
        rows += groups[name]()
    return f"{bench_header('benchmarks/run.py', quick)}\n{format_table(rows)}"


def _shard_rows(quick: bool) -> list[dict]:
    from .shards import run

    return run(quick=quick)


def _shuffle_rows(quick: bool) -> list[dict]:
    from .shuffle import run

    return run(quick=quick)


def _distributed_rows(quick: bool) -> list:
    from .distributed import distributed_rows

    return distributed_rows(quick=quick)


if __name__ == "__main__":
    # As a script this file is not yet the module benchmarks.run, whose relative imports need the package.
    runner = importlib.import_module("benchmarks.run")
    raise SystemExit(runner.main())
