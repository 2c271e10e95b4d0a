"""Tokens/s of DDP and FSDP on 2 gloo ranks, ``Trainer.fit`` and hand-written loops, side by side in one launch.

    python benchmarks/run.py --only fsdp_pace [--quick]

The model has the architecture and the widths of SmolLM2-135M (Llama: hidden 576, MLP 1536, 9 heads of
which 3 key/value heads, vocabulary 49,152, tied embeddings) but ``LAYERS`` decoder layers instead of 30,
randomly initialised (``transformers.LlamaConfig``): the speed question does not need the pretrained
weights, and the whole model would make each repeat minutes long on this machine. fp32, AdamW, every weight
trainable, 4 random sequences of ``SEQ`` tokens a rank a step (batch 8 on 2 ranks).

Four setups in the same 2 processes (one torch thread each), each with its own copy of the model:
``Trainer.fit`` with ``strategy="ddp"`` and ``"fsdp"``, a hand-written DDP loop and a hand-written FSDP2
loop (``fully_shard`` on every decoder layer, then the root, as the trainer shards). Each repeat runs
``steps`` steps of each setup in turn (the order rotating from repeat to repeat); a setup's rate in a
repeat is rank 0's median step after the first of the repeat (the first step of a ``fit`` call includes
its start: the loss check, the batcher). Every ratio is the median over the repeats of the ratios within
a repeat, so a change in the machine's load between repeats does not enter it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from .common import Row, child_command, launch_ranks

WORKER_FLAG = "--worker"
LAYERS = 4
SEQ = 64
SEQS_PER_RANK = 4
SETUPS = ("ddp_fit", "fsdp_fit", "ddp_hand", "fsdp_hand")


def fsdp_rows(quick: bool = False) -> list[Row]:
    """FSDP against DDP (both ``Trainer.fit``, and both by hand), and each ``Trainer.fit`` against its hand loop."""
    job = {"repeats": 2 if quick else 5, "steps": 3 if quick else 4}
    command, env = child_command("fsdp_pace", WORKER_FLAG, json.dumps(job))
    rates: dict[str, list[float]] = launch_ranks(command, env, 2, 3600.0, "fsdp pace run")[0]
    what = f"SmolLM2-135M widths, {LAYERS} layers, 2 ranks, tokens/s"
    pairs = (("fsdp_fit", "ddp_fit"), ("fsdp_hand", "ddp_hand"), ("ddp_fit", "ddp_hand"), ("fsdp_fit", "fsdp_hand"))
    return [Row(f"{what}: {a}", b, statistics.median(rates[a]), statistics.median(rates[b]),
                statistics.median([x / y for x, y in zip(rates[a], rates[b])]), "", unit="tokens/s") for a, b in pairs]


def worker(job: dict[str, Any]) -> dict[str, list[float]]:
    """One rank: the four setups, ``repeats`` rounds of ``steps`` steps each; tokens/s per setup and round."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import fully_shard

    import batchfit as bf

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # the trainers join it
    rank, world = dist.get_rank(), dist.get_world_size()
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=LAYERS, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                                      tie_word_embeddings=True)

    def fresh() -> Any:
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)

    batch = SEQS_PER_RANK * world
    steps = job["steps"]
    rng = np.random.default_rng(0)
    ids = rng.integers(10, config.vocab_size, (batch * steps, SEQ)).astype(np.int64)
    data = bf.ArraySource(input_ids=ids, labels=ids.copy())
    tokens = batch * SEQ  # a step's tokens over all ranks
    runs: dict[str, Any] = {}

    for strategy in ("ddp", "fsdp"):
        times: list[float] = []

        class Clock(bf.Callback):
            def on_step_end(self, trainer: Any, record: dict, times: list[float] = times) -> None:
                times.append(time.perf_counter())

        model = fresh()
        trainer = bf.Trainer(model, None, torch.optim.AdamW(model.parameters(), lr=1e-5), batch_size=batch,
                             shuffle=False, device="cpu", progress=False, strategy=strategy, callbacks=[Clock()])

        def fit(trainer: Any = trainer, times: list[float] = times) -> list[float]:
            times.clear()
            trainer.fit(data, epochs=1)
            return list(np.diff(times))  # from the end of the first step on

        runs[f"{strategy}_fit"] = fit

    for strategy in ("ddp", "fsdp"):
        model = fresh()
        if strategy == "fsdp":
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            net = model
        else:
            net = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def hand(net: Any = net, optimizer: Any = optimizer) -> list[float]:
            marks = []
            for step in range(steps):
                start = step * batch + rank * SEQS_PER_RANK
                share = torch.as_tensor(ids[start:start + SEQS_PER_RANK])
                loss = net(input_ids=share, labels=share).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                marks.append(time.perf_counter())
            return list(np.diff(marks))

        runs[f"{strategy}_hand"] = hand

    for run in runs.values():  # warm-up of each
        run()
    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    for repeat in range(job["repeats"]):
        order = SETUPS[repeat % len(SETUPS):] + SETUPS[:repeat % len(SETUPS)]
        for name in order:
            dist.barrier()
            rates[name].append(tokens / statistics.median(runs[name]()))
    return rates


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only fsdp_pace [--quick]``: the table."""
    import argparse

    from .common import format_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(format_table(fsdp_rows(quick=args.quick)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit(f"usage: python -m benchmarks.fsdp_pace {WORKER_FLAG} JOB_JSON (started by fsdp_rows)")
