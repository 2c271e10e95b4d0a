"""Prefetching: ``prefetch=2`` against ``prefetch=0``, and what a thread's hand-over costs.

    python benchmarks/run.py --only prefetch [--quick] [--repeats N]

Every row trains (or only iterates) one pass over the same batches with and without
prefetching, the two interleaved, each with one torch thread; the ratio is the median of the
per-repeat ratios of samples/s. The consumer is the reference MLP 64-256-256-10 (SGD) except
in the "iterate only" rows, where nothing competes with the thread for the GIL but the loop.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from batchfit.bench import mlp, reference_data
from batchfit.data import prefetch as prefetching
from batchfit.data.batcher import Batcher
from batchfit.data.shards import ShardSource, write_shards
from batchfit.data.sources import ArraySource, Batch

from .common import Row, interleaved

Pairs = Iterable[tuple[torch.Tensor, torch.Tensor]]


def costly_transform(batch: Batch) -> Batch:
    """A vectorised augmentation about as costly as the reference step: 8 random 64x64 mixes."""
    x, y = cast("tuple[torch.Tensor, torch.Tensor]", batch)
    for _ in range(8):
        x = torch.tanh(x @ (torch.eye(64) + 0.05 * torch.randn(64, 64)))
    return x, y


def _trainer_pass(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Pairs], int]:
    def train(batches: Pairs) -> int:
        samples = 0
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += len(y)
        return samples
    return train


def _iterate_pass(batches: Pairs) -> int:
    return sum(len(y) for _, y in batches)


def _pair(src: Any, consume: Callable[[Pairs], int], batches: int, passes: int = 1,
          **options: Any) -> dict[str, Callable[[], int]]:
    """``prefetch=2`` and ``prefetch=0`` over the first ``batches`` batches of an epoch of ``src``, ``passes`` times."""
    def run(prefetch: int) -> Callable[[], int]:
        def one() -> int:
            samples = 0
            for _ in range(passes):
                batcher = Batcher(src, batch_size=256, seed=0, prefetch=prefetch, **options)
                samples += consume(cast("Pairs", (batch for _, batch in zip(range(batches), batcher.remaining()))))
            return samples
        return one
    return {"prefetch=2": run(2), "prefetch=0": run(0)}


def parallel_row(repeats: int) -> Row:
    """How much compute two threads get done at once against one: the most a prefetch thread can overlap."""
    a = torch.randn(256, 256)

    def work(count: int = 200) -> int:
        for _ in range(count):
            a @ a
        return count

    def two_threads() -> int:
        helper = threading.Thread(target=work)
        helper.start()
        work()
        helper.join()
        return 400

    rates = interleaved({"2 threads": two_threads, "1 thread": work}, repeats, rotate=True)
    return Row("compute in 2 threads at once (256x256 matmuls, 1 torch thread each)", "1 thread",
               statistics.median(rates["2 threads"]), statistics.median(rates["1 thread"]),
               statistics.median(a / b for a, b in zip(rates["2 threads"], rates["1 thread"])), "(informative)",
               "matmuls/s")


def cpu_time_row(src: ArraySource, repeats: int) -> Row:
    """prefetch=2 against prefetch=0 from memory, iterate only, in the process's CPU time.

    What the probes and the extra generator layers cost, without the wall-clock noise of a shared
    machine (other processes' load moves wall-clock ratios of identical runs by 2-14% here). No
    thread starts in this case; if one did, its CPU time would count too.
    """
    candidates = _pair(src, _iterate_pass, len(src) // 256, passes=3)
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for repeat in range(repeats):
        names = list(candidates)[repeat % 2:] + list(candidates)[: repeat % 2]
        for name in names:
            start = time.process_time()
            samples = candidates[name]()
            seconds[name].append(time.process_time() - start)
    ratios = [b / a for a, b in zip(seconds["prefetch=2"], seconds["prefetch=0"])]
    extra_us = statistics.median(a - b for a, b in zip(seconds["prefetch=2"], seconds["prefetch=0"])) \
        / (samples / 256) * 1e6
    return Row(f"prefetch=2, from memory, iterate only, process CPU time: {extra_us:.2f} us more a batch",
               "prefetch=0", samples / statistics.median(seconds["prefetch=2"]),
               samples / statistics.median(seconds["prefetch=0"]), statistics.median(ratios), ">=0.95")


def _cold(src_path: Path, max_mapped_bytes: int) -> Callable[[], ShardSource]:
    """A fresh ShardSource whose files were just dropped from the page cache."""
    def open_cold() -> ShardSource:
        for path in src_path.iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return ShardSource(src_path, max_mapped_bytes=max_mapped_bytes)
    return open_cold


def handoff_rows(num_samples: int, repeats: int) -> list[Row]:
    """What handing batches over through the thread costs, against producing them inline."""
    x, y = reference_data(num_samples)
    src = ArraySource(x, y)

    def batches() -> Iterator[Batch]:
        return Batcher(src, batch_size=256, seed=0).remaining()

    prebuilt = list(batches())

    def inline(items: Callable[[], Iterable[Batch]]) -> Callable[[], int]:
        return lambda: _iterate_pass(cast("Pairs", items()))

    def threaded(items: Callable[[], Iterable[Batch]]) -> Callable[[], int]:
        return lambda: _iterate_pass(cast("Pairs", prefetching.thread_prefetch(items(), 2)))

    rates = interleaved({"thread, prebuilt batches": threaded(lambda: prebuilt),
                         "inline, prebuilt batches": inline(lambda: prebuilt),
                         "thread, gathered batches": threaded(batches),
                         "inline, gathered batches": inline(batches)}, repeats, rotate=True)
    rows = []
    for kind in ("prebuilt", "gathered"):
        thread, inline_rates = rates[f"thread, {kind} batches"], rates[f"inline, {kind} batches"]
        per_batch_us = statistics.median(256e6 * (1 / a - 1 / b) for a, b in zip(thread, inline_rates))
        rows.append(Row(f"thread hand-over, {kind} batches, iterate only: {per_batch_us:.0f} us a batch",
                        f"inline, {kind} batches", statistics.median(thread), statistics.median(inline_rates),
                        statistics.median(a / b for a, b in zip(thread, inline_rates)), "(informative)"))
    return rows


def prefetch_rows(quick: bool = False, repeats: int | None = None) -> list[Row]:
    """prefetch=2 against prefetch=0: from memory, from warm shards, with a costly transform, cold shards."""
    repeats = repeats or (3 if quick else 15)
    num_samples = 50_000 if quick else 200_000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="batchfit-bench-prefetch-"))
    try:
        x, y = reference_data(num_samples)
        memory = ArraySource(x, y)
        model = mlp()
        train = _trainer_pass(model, torch.optim.SGD(model.parameters(), lr=0.01))
        shards13 = write_shards(folder / "warm13", (x.numpy(), y.numpy()), shard_size=num_samples // 12)
        every = num_samples // 256
        cases: list[tuple[str, dict[str, Callable[[], int]]]] = [
            ("from memory, iterate only (3 epochs a run)", _pair(memory, _iterate_pass, every, passes=3)),
            ("from memory, MLP step", _pair(memory, train, every // 3)),
            (f"warm shards ({len(shards13.shard_sizes)}), MLP step", _pair(shards13, train, every // 3)),
            ("costly transform, MLP step", _pair(memory, train, every // 4, transform=costly_transform)),
        ]
        # The noise floor: prefetch=0 against itself, interleaved with the iterate-only pair (each
        # pass is short, so that pair gets twice the repeats).
        cases[0][1]["prefetch=0, again"] = _pair(memory, _iterate_pass, every, passes=3)["prefetch=0"]
        rows = [parallel_row(repeats), *handoff_rows(num_samples, repeats)]
        for index, (name, candidates) in enumerate(cases):
            for run_once in candidates.values():  # warm-up
                run_once()
            rates = interleaved(candidates, 2 * repeats if index == 0 else repeats, rotate=True)
            rows.append(_row(name, rates))
            if "prefetch=0, again" in rates:
                same = [a / b for a, b in zip(rates["prefetch=0, again"], rates["prefetch=0"])]
                rows.append(Row(f"prefetch=0 again (the noise floor), {name}", "prefetch=0",
                                statistics.median(rates["prefetch=0, again"]), statistics.median(rates["prefetch=0"]),
                                statistics.median(same), "(informative)"))
        rows.append(cpu_time_row(memory, 2 * repeats))
        rows.append(_cold_row(folder, quick, repeats))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _cold_row(folder: Path, quick: bool, repeats: int) -> Row:
    """Shards on a cold page cache, full shuffle past the mapping limit (read by pread), MLP 256-128-10 step."""
    limit = (8 if quick else 32) * 2**20
    rows = 8 * limit // 1024  # 1 KiB samples (256 float32), 8x the mapping limit
    rng = np.random.default_rng(0)
    path = folder / "cold"
    write_shards(path, ((rng.standard_normal((8192, 256), dtype=np.float32), rng.integers(0, 10, 8192))
                        for _ in range(rows // 8192)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    train = _trainer_pass(model, torch.optim.SGD(model.parameters(), lr=0.01))
    open_cold = _cold(path, limit)
    batches = 150 if quick else 400
    rates: dict[str, list[float]] = {"prefetch=2": [], "prefetch=0": []}
    for repeat in range(min(repeats, 6)):
        for prefetch in (2, 0) if repeat % 2 == 0 else (0, 2):
            batcher = Batcher(open_cold(), batch_size=256, seed=0, shuffle="full", prefetch=prefetch)
            batcher.order()
            start = time.perf_counter()
            samples = train(cast("Pairs", (b for _, b in zip(range(batches), batcher.remaining()))))
            rates[f"prefetch={prefetch}"].append(samples / (time.perf_counter() - start))
    return _row(f"cold shards, shuffle full, {rows} x 1 KiB = 8x the mapping limit ({limit // 2**20} MiB), "
                f"first {batches} batches, MLP 256-128-10 step", rates)


def _row(name: str, rates: dict[str, list[float]]) -> Row:
    ratios = [a / b for a, b in zip(rates["prefetch=2"], rates["prefetch=0"])]
    target = ">=0.95" if "memory" in name or "warm" in name else ">=1.0"
    return Row(f"prefetch=2, {name}", "prefetch=0", statistics.median(rates["prefetch=2"]),
               statistics.median(rates["prefetch=0"]), statistics.median(ratios), target)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only prefetch [--quick] [--repeats N]``."""
    import argparse

    from .common import format_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    print(format_table(prefetch_rows(quick=args.quick, repeats=args.repeats)))
