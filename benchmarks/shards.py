"""Benchmarks of the shard format.

    python benchmarks/run.py --only shards [--quick] [--size-gb 4] [--dir /tmp]

1. Resident memory: write a dataset of ``--size-gb`` GiB from a generator (float32 features
   256 wide, int64 labels, stored sorted by label), then train one epoch of a small MLP on it
   with plain PyTorch in a child process and report the child's peak RSS (VmHWM).
2. Warm page cache: batches from a ShardSource of 1, 13 and 98 shards against batches from an
   ArraySource of the same 200,000 x 64 float32 samples (10 classes, batch 256, shuffled), one
   torch thread, interleaved repeats that each start with the next source, medians.
3. Cold page cache: one epoch of reading the big dataset with shuffle="block" and with
   shuffle="full", each in a fresh child after the shard files were evicted from the cache.
4. Shuffle quality on data stored sorted by label: label diversity per batch and the test
   accuracy of a small MLP trained a few epochs with shuffle False, "block" and "full".

``run(quick)`` returns the rows (dicts with what, baseline, rate, baseline_rate, ratio, target,
unit) for the runner's table; ``main`` prints them as a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F

from batchfit.data.batcher import Batcher
from batchfit.data.shards import ShardSource, write_shards
from batchfit.data.sources import ArraySource

from .common import child_command, interleaved, ratio_row, run_child_task

WIDTH = 256  # features of the big dataset
CLASSES = 10


class BlockOptions(TypedDict, total=False):
    """The Batcher options of a block shuffle."""

    block_size: int
    window_blocks: int


# name -> (shuffle, Batcher options); the two block variants differ in blocks per window
ORDERS: dict[str, tuple[bool | str, BlockOptions]] = {
    "none": (False, {}),
    "block 4096x8": ("block", {"block_size": 4096, "window_blocks": 8}),
    "block 512x16": ("block", {"block_size": 512, "window_blocks": 16}),
    "full": ("full", {}),
}


# --- data ---------------------------------------------------------------------------------------


def sorted_batches(num_samples: int, width: int, seed: int = 0, rows: int = 65536) -> Iterator[tuple]:
    """Gaussian clusters, one per class, generated class after class (stored sorted by label)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLASSES, width)).astype(np.float32)
    bounds = np.linspace(0, num_samples, CLASSES + 1).astype(int)
    for label in range(CLASSES):
        for lo in range(bounds[label], bounds[label + 1], rows):
            n = min(rows, bounds[label + 1] - lo)
            x = rng.standard_normal((n, width), dtype=np.float32)
            x += centers[label]
            yield x, np.full(n, label, dtype=np.int64)


def mixture(num_samples: int, seed: int, width: int = 64, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A 10-class problem a small MLP learns to ~90%: 4 Gaussian clusters per class."""
    means = np.random.default_rng(7).standard_normal((CLASSES, 4, width)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, num_samples)
    x = means[labels, rng.integers(0, 4, num_samples)]
    x += spread * rng.standard_normal((num_samples, width), dtype=np.float32)
    return x, labels


def xy(batches: Batcher) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The batcher itself, typed: every source here is written from ``(x, y)``, so its batches are pairs."""
    return cast("Iterable[tuple[torch.Tensor, torch.Tensor]]", batches)


def mlp(width: int, hidden: int = 128) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evict(folder: Path) -> str:
    """Drop the shard files' pages from the page cache (they are clean after the fsynced write)."""
    if hasattr(os, "posix_fadvise"):
        for path in folder.iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")
    return "drop_caches"


# --- child tasks (run in a fresh process so peak RSS and the cache state are their own) ---------


def child_write(path: str, num_samples: int) -> dict[str, Any]:
    start = time.perf_counter()
    src = write_shards(path, sorted_batches(num_samples, WIDTH), overwrite=True)
    return {"seconds": time.perf_counter() - start, "shards": len(src.shard_sizes), "peak_rss_mib": peak_rss_mib()}


def child_train(path: str, order: str) -> dict[str, Any]:
    """One epoch of plain PyTorch training (Batcher, forward, backward, SGD) from shards."""
    torch.set_num_threads(1)  # a tiny model; more threads only contend on a busy machine
    torch.manual_seed(0)
    model = mlp(WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    shuffle, options = ORDERS[order]
    batches = Batcher(ShardSource(path), batch_size=256, shuffle=shuffle, seed=0, **options)
    start, samples, loss = time.perf_counter(), 0, torch.zeros(())
    for x, y in xy(batches):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        samples += len(y)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": samples, "loss": loss.item(), "peak_rss_mib": peak_rss_mib()}


def child_read(path: str, order: str) -> dict[str, Any]:
    """One epoch of batches, read only (the page cache was emptied by the parent)."""
    shuffle, options = ORDERS[order]
    batches = Batcher(ShardSource(path), batch_size=256, shuffle=shuffle, seed=0, **options)
    batches.order()  # the permutation is not part of the reading
    start, samples, first = time.perf_counter(), 0, None
    for x, _ in xy(batches):
        samples += len(x)
        if first is None and samples >= 256 * 1000:
            first = samples / (time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if first is None:  # an epoch shorter than 1000 batches (a small --size-gb): its first batches are all of it
        first = samples / seconds
    return {"rate": samples / seconds, "first_1000": first, "seconds": seconds, "peak_rss_mib": peak_rss_mib()}


CHILD_TASKS: dict[str, Callable[..., dict[str, Any]]] = {"write": child_write, "train": child_train, "read": child_read}


def in_child(task: str, *args: Any) -> dict[str, Any]:
    """Run a child task with this module as a script and return its JSON result."""
    command, env = child_command("shards", "--child", json.dumps([task, *args]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child task {task} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the benchmarks -----------------------------------------------------------------------------


def row(what: str, baseline: str, rate: float, baseline_rate: float, ratio: float, target: str, unit: str) -> dict:
    return {"what": what, "baseline": baseline, "rate": rate, "baseline_rate": baseline_rate,
            "ratio": ratio, "target": target, "unit": unit}


def bench_big(folder: Path, size_gb: float, cold_repeats: int) -> list[dict]:
    """(1) write and train from a big dataset: peak RSS; (3) cold-cache block vs full reads."""
    num_samples = int(size_gb * 2**30 // (WIDTH * 4 + 8))
    path = folder / "big"
    written = in_child("write", str(path), num_samples)
    data_mib = sum(p.stat().st_size for p in path.iterdir()) / 2**20
    rows = [row(f"write {data_mib / 1024:.2f} GiB from a generator ({written['shards']} shards), writer peak RSS",
                "dataset size", written["peak_rss_mib"], data_mib, written["peak_rss_mib"] / data_mib,
                "< 1024 MiB", "MiB"),
            row("write throughput", "-", data_mib / written["seconds"], float("nan"), float("nan"), "-", "MiB/s")]
    for order in ("full", "block 4096x8"):
        trained = in_child("train", str(path), order)
        rows.append(row(f"train 1 epoch MLP {WIDTH}-128-10 from shards, shuffle {order}: child peak RSS",
                        "dataset size", trained["peak_rss_mib"], data_mib, trained["peak_rss_mib"] / data_mib,
                        "< 1024 MiB", "MiB"))
        rows.append(row(f"  its training throughput (1 thread, last loss {trained['loss']:.3f})", "-",
                        trained["samples"] / trained["seconds"], float("nan"), float("nan"), "-", "samples/s"))
    cold = ("block 4096x8", "block 512x16", "full")
    reads: dict[str, list[dict]] = {order: [] for order in cold}
    how = ""
    for _ in range(cold_repeats):
        for order in cold:
            how = evict(path)
            reads[order].append(in_child("read", str(path), order))
    for key, label in (("rate", "1 epoch"), ("first_1000", "first 1000 batches")):
        for order in cold:
            ratio = statistics.median(a[key] / b[key] for a, b in zip(reads[order], reads["full"]))
            rows.append(row(f"cold cache ({how}), {label} read, shuffle {order}", "shuffle full",
                            statistics.median(r[key] for r in reads[order]),
                            statistics.median(r[key] for r in reads["full"]), ratio, "(informative)", "samples/s"))
    shutil.rmtree(path)
    return rows


def epochs(src: Any, shuffle: bool | str) -> Callable[[], int]:
    """A function that reads one epoch of batches of 256 from ``src`` and returns its samples; call
    ``k`` reads epoch ``k`` (seed ``k``), so interleaved sources read the same orders."""
    calls = itertools.count()

    def read() -> int:
        samples = 0
        for batch in xy(Batcher(src, batch_size=256, shuffle=shuffle, seed=next(calls))):
            samples += len(batch[0])
        return samples

    return read


# name -> samples per shard (None: one shard) of the warm-cache comparison
WARM_SHARDS = {"1 shard": None, "13 shards": 16384, "98 shards": 2048}


def bench_warm(folder: Path, repeats: int) -> list[dict]:
    """(2) warm-cache batches from 1, 13 and 98 shards against batches from memory: same data,
    same order, one torch thread, the sources interleaved (each repeat starting with the next)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200_000, 64), dtype=np.float32), rng.integers(0, CLASSES, 200_000)
    sources: dict[str, Any] = {"ArraySource": ArraySource(x, y)}
    for name, shard_size in WARM_SHARDS.items():
        sources[name] = write_shards(folder / f"warm {name}", (x, y), shard_size=shard_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for shuffle in (True, "block"):
            candidates = {name: epochs(src, shuffle) for name, src in sources.items()}
            for run_once in candidates.values():  # warm-up: page cache, maps, allocator
                run_once()
            rates = interleaved(candidates, repeats, rotate=True)
            for name in WARM_SHARDS:
                target = ">= 0.9" if shuffle is True else "(informative)"
                found = ratio_row(name, "ArraySource", rates, target)
                rows.append(row(f"warm cache, 200000x64 f32, batch 256, shuffle={shuffle!r}, {name}",
                                "ArraySource", found.rate, found.baseline_rate, found.ratio, target, "samples/s"))
    finally:
        torch.set_num_threads(threads)
    for name in WARM_SHARDS:
        shutil.rmtree(folder / f"warm {name}")
    return rows


def diversity(src: ShardSource, order: str, batch_size: int = 256) -> tuple[float, float]:
    """Mean distinct labels per batch, and mean label entropy per batch (bits), over one epoch."""
    shuffle, options = ORDERS[order]
    distinct, entropy = [], []
    for _, y in xy(Batcher(src, batch_size=batch_size, shuffle=shuffle, seed=0, drop_last=True, **options)):
        counts = np.bincount(y.numpy(), minlength=CLASSES)
        p = counts[counts > 0] / counts.sum()
        distinct.append(len(p))
        entropy.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(distinct)), float(np.mean(entropy))


def accuracy_after(src: ShardSource, order: str, test: tuple[np.ndarray, np.ndarray], epochs: int) -> float:
    """Test accuracy of an MLP 64-128-10 trained ``epochs`` epochs (SGD, momentum 0.9)."""
    torch.manual_seed(0)
    model = mlp(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shuffle, options = ORDERS[order]
    batches = Batcher(src, batch_size=256, shuffle=shuffle, seed=0, **options)
    for _ in range(epochs):
        for x, y in xy(batches):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test[0])).argmax(1).numpy()
    return float((predicted == test[1]).mean())


def bench_quality(folder: Path, num_samples: int, epochs: int) -> list[dict]:
    """(4) data stored sorted by label: batch label diversity and test accuracy per shuffle."""
    x, y = mixture(num_samples, seed=1)
    by_label = np.argsort(y, kind="stable")
    src = write_shards(folder / "sorted", (x[by_label], y[by_label]))
    test = mixture(20_000, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {order: (*diversity(src, order), accuracy_after(src, order, test, epochs)) for order in ORDERS}
    finally:
        torch.set_num_threads(threads)
    rows = []
    full = results["full"]
    for order, (distinct, entropy, accuracy) in results.items():
        name = f"sorted by label, {num_samples} samples, shuffle {order}"
        rows.append(row(f"{name}: distinct labels per batch of 256", "shuffle full", distinct, full[0],
                        distinct / full[0], "-", "labels"))
        rows.append(row(f"{name}: label entropy per batch", "shuffle full", entropy, full[1],
                        entropy / full[1], "-", "bits"))
        rows.append(row(f"{name}: test accuracy after {epochs} epochs", "shuffle full", accuracy, full[2],
                        accuracy / full[2], "-", "fraction"))
    shutil.rmtree(folder / "sorted")
    return rows


def run(quick: bool = True, size_gb: float | None = None, folder: str | os.PathLike | None = None) -> list[dict]:
    """All four shard benchmarks; ``quick`` uses a 0.25 GiB dataset and fewer repeats."""
    size_gb = size_gb if size_gb is not None else (0.25 if quick else 4.0)
    work = Path(tempfile.mkdtemp(prefix="batchfit-bench-shards-", dir=folder))
    try:
        rows = bench_warm(work, repeats=7 if quick else 15)
        rows += bench_quality(work, num_samples=50_000 if quick else 100_000, epochs=3)
        rows += bench_big(work, size_gb, cold_repeats=1 if quick else 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    table = [("measured", "baseline", "median", "baseline median", "ratio", "target", "unit")]
    for r in rows:
        table.append((r["what"], r["baseline"], f"{r['rate']:.4g}", f"{r['baseline_rate']:.4g}",
                      f"{r['ratio']:.3f}", r["target"], r["unit"]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=4.0, help="size of the big dataset in GiB")
    parser.add_argument("--quick", action="store_true", help="a 0.25 GiB dataset and fewer repeats")
    parser.add_argument("--dir", default=None, help="where to write the datasets (default: the temp folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child_task(args.child, CHILD_TASKS)
        return
    size = 0.25 if args.quick and args.size_gb == 4.0 else args.size_gb
    print(format_rows(run(args.quick, size, args.dir)))


if __name__ == "__main__":
    main()
