"""Data-parallel scaling: the same training on 1 and on 2 processes of this machine.

Reference workload (docs/design.md): the MLP 64-256-256-10 on 200,000 x 64 float32 samples,
shuffled, batch 256 — the global batch, so the 2-process run makes the same updates. Every
process gets one intra-op thread, so 2 processes use twice the cores of 1, and the scaling
efficiency is ``samples/s with 2 / (2 x samples/s with 1)``; 1 means no cost for the gradient
all-reduce. A hand-written DistributedDataParallel loop on 2 processes shows what of that
cost is batchfit's (the Python around its step; its per-step agreement rides in the gradient
all-reduce) and what is the machine's.

Each measurement starts fresh processes (as torchrun would: MASTER_ADDR, RANK, WORLD_SIZE),
which train one epoch to warm up and then ``epochs`` timed epochs; the runs of the different
setups alternate, and the rows give medians.

Against the hand-written loops (DDP, and FSDP2's ``fully_shard`` for ``strategy="fsdp"``) the two
run side by side in the same 2 processes, alternating in chunks of a few steps (~2,560 samples: 10
steps at batch 256, 80 at batch 32): ``Trainer.fit`` trains, and a callback runs the hand-written
loop's chunk between two of its steps (:func:`measure_chunks`). The ratio is the median of the
chunks' ratios, so a change in the machine's load (minutes of it on a shared machine) does not fall
on one side only; the trainer's chunks include its epoch ends (one ``fit`` call covers all epochs).
:func:`measure_pairs` alternates whole epochs instead (each one ``fit`` call).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from .common import Row, child_command, launch_ranks

WORKER_FLAG = "--worker"


def distributed_rows(quick: bool = False) -> list[Row]:
    """Samples/s of one training on 1 and 2 processes, and the scaling efficiency."""
    job = {"num_samples": 50_000 if quick else 200_000, "batch_size": 256, "epochs": 1 if quick else 2}
    repeats = 1 if quick else 3
    one: list[float] = []
    two: list[float] = []
    hand: list[float] = []
    for _ in range(repeats):  # alternating, so that a change in the machine's load hits all alike
        one.append(measure(job, processes=1))
        two.append(measure(job, processes=2))
        hand.append(measure({**job, "loop": "hand"}, processes=2))
    what = "Trainer.fit, 2 processes (gloo), batch 256"
    rows = [
        # The baseline is twice the 1-process rate, so the ratio is the scaling efficiency.
        Row(what, "2 x Trainer.fit, 1 process", statistics.median(two), 2 * statistics.median(one),
            statistics.median([b / (2 * a) for a, b in zip(one, two)]), ""),
        Row(what, "hand-written DDP loop, 2 processes (separate launches)", statistics.median(two),
            statistics.median(hand), statistics.median([a / b for a, b in zip(two, hand)]), ""),
    ]
    for strategy, size in (("ddp", 256), ("ddp", 32), ("fsdp", 256)):
        rows.append(chunk_row(strategy, size, quick))
    return rows


def chunk_row(strategy: str, batch_size: int, quick: bool = False) -> Row:
    """``Trainer.fit`` against the hand-written loop of ``strategy``, alternating chunks of ~2,560 samples
    (:func:`measure_chunks`): samples/s, and the median of the chunks' ratios."""
    chunk = max(5, 2560 // batch_size)
    found = measure_chunks({"num_samples": 50_000 if quick else 200_000, "batch_size": batch_size,
                            "epochs": 1 if quick else 2, "strategy": strategy, "chunk": chunk})
    samples = chunk * batch_size
    baseline = "hand-written DDP loop" if strategy == "ddp" else "hand-written FSDP2 loop"
    return Row(f"Trainer.fit strategy={strategy!r}, 2 processes, batch {batch_size}",
               f"{baseline}, same processes, alternating chunks of {chunk} steps",
               samples / statistics.median(found["fit"]), samples / statistics.median(found["hand"]),
               statistics.median([h / f for f, h in zip(found["fit"], found["hand"])]), "")


def measure_pairs(job: dict[str, Any]) -> dict[str, list[float]]:
    """Samples/s of ``Trainer.fit`` and of the hand-written loop, epoch by epoch, side by side in 2 processes."""
    return launch({**job, "loop": "pair"}, processes=2)  # type: ignore[return-value]


def measure(job: dict[str, Any], processes: int, timeout: float = 900.0) -> float:
    """Median samples/s over the timed epochs of one launch of ``processes`` fresh processes."""
    return float(launch(job, processes, timeout)["samples_per_s"])


def launch(job: dict[str, Any], processes: int, timeout: float = 900.0) -> dict[str, Any]:
    """What rank 0 of one launch of ``processes`` fresh processes running ``job`` reported."""
    command, env = child_command("distributed", WORKER_FLAG, json.dumps(job))
    return launch_ranks(command, env, processes, timeout, "benchmark run")[0]


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One process of a measurement: warm-up epoch, then timed epochs; rank 0's rate is the run's."""
    import torch
    import torch.nn.functional as F

    from batchfit.bench import mlp, reference_data
    from batchfit.train.trainer import Trainer

    torch.set_num_threads(1)
    x, y = reference_data(job["num_samples"])
    if job.get("loop") == "pair":
        return _pair_worker(job, x, y)
    if job.get("loop") == "chunks":
        return _chunk_worker(job, x, y)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if job.get("loop") == "hand":
        run_epoch = _hand_ddp_epoch(model, optimizer, x, y, job["batch_size"])
    else:
        trainer = Trainer(model, F.cross_entropy, optimizer, batch_size=job["batch_size"], device="cpu",
                          progress=False, seed=0)

        def run_epoch() -> None:
            trainer.fit((x, y), epochs=1)

    run_epoch()  # warm-up: allocations, lazy imports, the process group's first use
    rates = []
    for _ in range(job["epochs"]):
        start = time.perf_counter()
        run_epoch()  # every rank ends the epoch with the same last all-reduce
        rates.append(len(x) / (time.perf_counter() - start))
    return {"samples_per_s": statistics.median(rates)}


def _pair_worker(job: dict[str, Any], x: Any, y: Any) -> dict[str, Any]:
    """``Trainer.fit`` and the hand-written loop of ``job["strategy"]`` side by side, epoch by epoch."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from batchfit.bench import mlp
    from batchfit.train.trainer import Trainer

    strategy = job["strategy"]
    model = mlp()
    hand = _hand_ddp_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), x, y,
                           job["batch_size"], sharded=strategy == "fsdp")
    model = mlp()  # the trainer joins the process group the hand-written loop started
    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      batch_size=job["batch_size"], device="cpu", progress=False, seed=0, strategy=strategy)

    def fit() -> None:
        trainer.fit((x, y), epochs=1)

    hand()  # warm-up of each
    fit()
    rates: dict[str, list[float]] = {"hand": [], "fit": []}
    for pair in range(job["epochs"]):
        for name, run in (("hand", hand), ("fit", fit)) if pair % 2 == 0 else (("fit", fit), ("hand", hand)):
            dist.barrier()  # both ranks start together
            start = time.perf_counter()
            run()
            rates[name].append(len(x) / (time.perf_counter() - start))
    return rates


def measure_chunks(job: dict[str, Any]) -> dict[str, list[float]]:
    """Seconds of ``chunk`` steps of ``Trainer.fit`` and of the hand-written loop, alternating chunk by chunk in
    the same 2 processes (rank 0's clock)."""
    return launch({**job, "loop": "chunks"}, processes=2)  # type: ignore[return-value]


def _chunk_worker(job: dict[str, Any], x: Any, y: Any) -> dict[str, Any]:
    """``Trainer.fit`` with the hand-written loop run between its steps: every ``chunk`` steps of the trainer
    (timed from step to step, its bookkeeping and epoch ends included), ``chunk`` steps of the hand-written
    loop (timed alone). Interleaving in chunks of a few milliseconds, not epochs, keeps a change in the
    machine's load from falling on one side only. A step's time counts once its collective is done, so the
    ranks' clocks agree to a step."""
    import torch
    import torch.nn.functional as F

    from batchfit import Callback
    from batchfit.bench import mlp
    from batchfit.train.trainer import Trainer

    strategy, chunk, size = job["strategy"], job["chunk"], job["batch_size"]
    model = mlp()
    hand = _hand_ddp_steps(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), x, y, size,
                           sharded=strategy == "fsdp")
    times: dict[str, list[float]] = {"hand": [], "fit": []}

    class Alternate(Callback):
        """After every ``chunk`` trainer steps, ``chunk`` hand-written steps."""

        mark = 0.0

        def on_step_begin(self, trainer: Any, step: int) -> None:
            if step % chunk or not step:
                if not step:
                    self.mark = time.perf_counter()
                return
            now = time.perf_counter()
            times["fit"].append(now - self.mark)
            hand(chunk)
            self.mark = time.perf_counter()
            times["hand"].append(self.mark - now)

    model = mlp()
    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      batch_size=size, device="cpu", progress=False, seed=0, strategy=strategy,
                      callbacks=[Alternate()])
    hand(chunk)  # warm-up of each
    trainer.fit((x, y), epochs=1)
    times = {"hand": [], "fit": []}
    trainer.fit((x, y), epochs=job["epochs"])
    warm = 2  # the first chunks of the fit: its start (loss check, batcher) is not a step
    return {name: values[warm:] for name, values in times.items()}


def _hand_ddp_epoch(model: Any, optimizer: Any, x: Any, y: Any, batch_size: int, sharded: bool = False) -> Any:
    """The baseline, an epoch a call: :func:`_hand_ddp_steps`."""
    steps = _hand_ddp_steps(model, optimizer, x, y, batch_size, sharded)
    per_epoch = -(-len(x) // batch_size)

    def run_epoch() -> None:
        steps(per_epoch)

    return run_epoch


def _hand_ddp_steps(model: Any, optimizer: Any, x: Any, y: Any, batch_size: int, sharded: bool = False) -> Any:
    """The baseline: torch.distributed and DDP (or FSDP2's ``fully_shard``, ``sharded``) by hand, each rank
    indexing its share of every batch; the returned function runs the next ``n`` steps, a new order each
    epoch."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        net = fully_shard(model)  # the root alone, as the Trainer shards an MLP without blocks
        optimizer = type(optimizer)(net.parameters(), **optimizer.defaults)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(0)
    at = {"start": len(x), "order": torch.arange(0)}

    def run_steps(n: int) -> None:
        for _ in range(n):
            if at["start"] >= len(x):
                at["order"], at["start"] = torch.randperm(len(x), generator=generator), 0
            start = at["start"]
            batch = at["order"][start : start + batch_size]
            at["start"] = start + batch_size
            share = batch[rank * len(batch) // world_size : (rank + 1) * len(batch) // world_size]
            loss = F.cross_entropy(net(x[share]), y[share])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return run_steps


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only distributed [--quick]``: the table and the scaling efficiency."""
    import argparse

    from .common import format_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rows = distributed_rows(quick=args.quick)
    print(format_table(rows))
    row = rows[0]
    print(f"1 process: {row.baseline_rate / 2:,.0f} samples/s; 2 processes: {row.rate:,.0f} samples/s; "
          f"scaling efficiency: {row.ratio:.2f}")
    for row in rows[2:]:
        print(f"{row.what} against the {row.baseline}: {row.ratio:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit(f"usage: python -m benchmarks.distributed {WORKER_FLAG} JOB_JSON "
                         f"(started by distributed_rows)")
