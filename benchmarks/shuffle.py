"""A full shuffle of shards larger than the mapping limit, against a block shuffle.

    python benchmarks/run.py --only shuffle [--quick] [--limit-mib 64] [--dir /tmp]

The data (1 KiB samples: 256 float32 features and an int64 label) is 8x the ShardSource's
mapping limit, lowered from its default (256 MiB) to ``--limit-mib`` so that the data is a few
hundred MiB. Every measurement runs in a fresh child process (its own peak RSS, its own maps),
the orders interleaved, repeated, medians:

- read one epoch (warm page cache), or its first batches (cold: the files' pages dropped with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` before each child), with ``shuffle="full"`` (the runs
  of sparse gathers submitted to io_uring, where the kernel allows it), ``"full"`` with one
  pread a run, ``"full"`` read through the maps only (the read path before pread), and
  ``"block"`` (512 x 16, the Batcher's default);
- train one epoch of an MLP 256-128-10 with ``prefetch=2``, full against block.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchfit.data.batcher import Batcher
from batchfit.data.shards import ShardSource, runs, write_shards
from batchfit.data.shards import read as shard_read

from .common import child_command, run_child_task
from .shards import evict, peak_rss_mib, row, xy

WIDTH = 256
# name -> (shuffle, how sparse rows are read: "io_uring" where available, else "pread"; "pread"
# one system call a run; "maps" through the memory maps, as before either)
ORDERS = {"full": ("full", "io_uring"), "full, one pread a run": ("full", "pread"),
          "full, maps only": ("full", "maps"), "block": ("block", "io_uring")}


def _batcher(path: str, order: str, limit: int, prefetch: int = 0) -> Batcher:
    shuffle, read = ORDERS[order]
    if read == "maps":
        shard_read.PREADS_PER_FAULT = 0  # every read through the maps, as before pread
    if read == "pread":
        runs.URING_RUNS = 2**62  # no gather is large enough for io_uring
    return Batcher(ShardSource(path, max_mapped_bytes=limit), batch_size=256, shuffle=shuffle, seed=0,
                   prefetch=prefetch)


def rss_mib() -> float:
    """This process's resident set size now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_read(path: str, order: str, limit: int, batches: int | None) -> dict[str, Any]:
    """Read one epoch (or its first ``batches`` batches): samples/s, RSS before and peak RSS."""
    torch.set_num_threads(1)
    batcher = _batcher(path, order, limit)
    batcher.order()  # the permutation is not part of the reading
    before = rss_mib()
    start, samples = time.perf_counter(), 0
    for index, (x, _) in enumerate(xy(batcher)):
        samples += len(x)
        if batches is not None and index + 1 == batches:
            break
    return {"rate": samples / (time.perf_counter() - start), "rss_before_mib": before,
            "peak_rss_mib": peak_rss_mib()}


def child_train(path: str, order: str, limit: int) -> dict[str, Any]:
    """Train one epoch of an MLP 256-128-10 (SGD), batches prefetched: samples/s and peak RSS."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batcher = _batcher(path, order, limit, prefetch=2)
    batcher.order()
    before = rss_mib()
    start, samples = time.perf_counter(), 0
    for x, y in xy(batcher):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        samples += len(y)
    return {"rate": samples / (time.perf_counter() - start), "rss_before_mib": before,
            "peak_rss_mib": peak_rss_mib()}


CHILD_TASKS: dict[str, Callable[..., dict[str, Any]]] = {"read": child_read, "train": child_train}


def in_child(task: str, *args: Any) -> dict[str, Any]:
    command, env = child_command("shuffle", "--child", json.dumps([task, *args]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child task {task} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_data(path: Path, size_bytes: int) -> int:
    """``size_bytes`` of 1 KiB samples (standard normal features, random labels); returns the count."""
    rows = size_bytes // (WIDTH * 4) // 8192 * 8192
    rng = np.random.default_rng(0)
    write_shards(path, ((rng.standard_normal((8192, WIDTH), dtype=np.float32), rng.integers(0, 10, 8192))
                        for _ in range(rows // 8192)), overwrite=True)
    return rows


def _ratio_rows(results: dict[str, list[dict]], label: str, baseline: str = "block") -> list[dict]:
    rows = []
    for order in results:
        if order == baseline:
            continue
        rates, base = [r["rate"] for r in results[order]], [r["rate"] for r in results[baseline]]
        ratio = statistics.median(a / b for a, b in zip(rates, base))
        target = ">= 0.5" if order == "full" and label.startswith("warm") else "(informative)"
        rows.append(row(f"{label}, shuffle {order}", f"shuffle {baseline}", statistics.median(rates),
                        statistics.median(base), ratio, target, "samples/s"))
    return rows


def _rss_rows(results: dict[str, list[dict]], label: str, limit: int, data_mib: float) -> list[dict]:
    """Peak RSS of the children against their RSS before reading; the ratio is the growth over the limit."""
    rows = []
    for order, found in results.items():
        worst = max(found, key=lambda r: r["peak_rss_mib"] - r["rss_before_mib"])
        growth = worst["peak_rss_mib"] - worst["rss_before_mib"]
        rows.append(row(f"{label}, shuffle {order}: peak RSS (data {data_mib:.0f} MiB; ratio: its growth "
                        f"over the {limit >> 20} MiB limit)", "RSS before reading", worst["peak_rss_mib"],
                        worst["rss_before_mib"], growth / (limit / 2**20), "(bounded)", "MiB"))
    return rows


def _rotated(names: list[str], shift: int) -> list[str]:
    shift %= len(names)
    return names[shift:] + names[:shift]


def run(quick: bool = True, limit_mib: int = 64, folder: str | None = None) -> list[dict]:
    """The rows: warm and cold reads, training with prefetch, peak RSS; data 8x the mapping limit."""
    repeats = 1 if quick else 3
    limit = limit_mib * 2**20
    work = Path(tempfile.mkdtemp(prefix="batchfit-bench-shuffle-", dir=folder))
    try:
        path = work / "data"
        num_samples = write_data(path, 8 * limit)
        data_mib = sum(p.stat().st_size for p in path.iterdir()) / 2**20
        cold_batches = 100 if quick else 400
        in_child("read", str(path), "block", limit, None)  # warm the page cache
        warm: dict[str, list[dict]] = {order: [] for order in ORDERS}
        cold: dict[str, list[dict]] = {order: [] for order in ORDERS}
        train: dict[str, list[dict]] = {order: [] for order in ("full", "block")}
        for repeat in range(repeats):  # each repeat starts with the next order
            for order in _rotated(list(ORDERS), repeat):
                warm[order].append(in_child("read", str(path), order, limit, None))
            for order in _rotated(list(train), repeat):
                train[order].append(in_child("train", str(path), order, limit))
        for repeat in range(repeats):
            for order in _rotated(list(ORDERS), repeat):
                evict(path)
                cold[order].append(in_child("read", str(path), order, limit, cold_batches))
        what = f"{num_samples} x 1 KiB samples = 8x the mapping limit ({limit_mib} MiB)"
        rows = _ratio_rows(warm, f"warm page cache, read 1 epoch of {what}")
        rows += _ratio_rows(cold, f"cold page cache, read the first {cold_batches} batches of 256")
        rows += _ratio_rows({"full": train["full"], "block": train["block"]},
                            "warm, train 1 epoch MLP 256-128-10, prefetch=2")
        rows += _rss_rows(warm, "warm reads", limit, data_mib)
        rows += _rss_rows({"full": train["full"], "block": train["block"]}, "training", limit, data_mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    from .shards import format_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer cold batches")
    parser.add_argument("--limit-mib", type=int, default=64, help="the mapping limit; the data is 8x it")
    parser.add_argument("--dir", default=None, help="where to write the data (default: the temp folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child_task(args.child, CHILD_TASKS)
        return
    print(format_rows(run(args.quick, args.limit_mib, args.dir)))


if __name__ == "__main__":
    main()
