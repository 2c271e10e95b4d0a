"""The CUDA path, checked on whatever GPU machine runs this: one table of checks, each with what it measured.

    python benchmarks/run.py --only gpu_check [--quick] [--device cuda|cpu]

Tests never need a GPU; this script is how the CUDA-only code is checked when one is at hand. Each
check compares batchfit against a plain PyTorch computation on the same device, or against its own
promise, and prints PASS or FAIL with the figure behind it:

1. ``fsdp_nccl``: ``strategy="fsdp"`` over NCCL (2 ranks with 2 GPUs or more, else one rank in a
   process group of its own), a small Llama with the token-weighted loss and micro-batches of 8,
   against a hand-written loop over whole batches on one GPU (TF32 off): largest weight difference.
2. ``pinned_prefetch``: the host batches are in pinned memory, and ``prefetch=2`` (copies on a side
   stream, overlapping compute) against ``prefetch=0`` on a model whose inputs are large: epoch time
   ratio, the median of interleaved runs.
3. ``bf16_token_loss``: ``precision="bf16"`` (autocast) with micro-batches against the fp32
   token mean over whole batches by hand: the first step's loss and the weights after one epoch.
4. ``memory_fit``: ``micro_batch_size="auto"`` under a budget of a quarter of the device's memory:
   the size found, the measured peak of a training step at that size and at twice that size.
5. ``out_of_memory``: a micro-batch far too large for the device: what the run raises.

``--device cpu`` runs the same checks on the CPU (gloo for ``fsdp_nccl``; the pinned-memory check is
skipped): a dry run of this script, as the tests do. No figure of this script is quoted in the docs
until a GPU machine has run it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchfit import ArraySource, BatchfitError, Callback, Trainer, find_micro_batch_size

from .common import child_command, launch_ranks, run_child_task

VOCAB, WIDTH, LAYERS, SEQ, BATCH, SAMPLES, LR = 512, 128, 4, 64, 32, 128, 0.05


def llama(seed: int = 0) -> torch.nn.Module:
    """A small Llama from a ``transformers`` config (no download), float32."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=SEQ, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def tokens(num: int = SAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences of 4 to SEQ tokens, a prompt of up to 8 ignored labels, padded with token 3."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, SEQ + 1, num)
    ids = np.full((num, SEQ), 3, dtype=np.int64)
    labels = np.full((num, SEQ), 3, dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(4, VOCAB, length)
        labels[row, :length] = ids[row, :length]
        labels[row, :rng.integers(0, 9)] = -100
    return {"input_ids": ids, "input_ids_lengths": lengths, "labels": labels, "labels_lengths": lengths}


def hand_loop(device: torch.device, epochs: int = 1) -> tuple[dict[str, torch.Tensor], float]:
    """Whole batches by hand in fp32: the loss is the mean over every target token of a batch. Returns the
    weights and the first batch's loss."""
    data, model = tokens(), llama().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    first = math.nan
    for _ in range(epochs):
        for lo in range(0, SAMPLES, BATCH):
            ids = torch.from_numpy(data["input_ids"][lo:lo + BATCH]).to(device)
            length = torch.from_numpy(data["input_ids_lengths"][lo:lo + BATCH]).to(device)
            inside = torch.arange(SEQ, device=device)[None, :] < length[:, None]
            labels = torch.from_numpy(data["labels"][lo:lo + BATCH]).to(device).masked_fill(~inside, -100)
            loss = model(input_ids=ids, attention_mask=inside.long(), labels=labels).loss
            first = loss.item() if math.isnan(first) else first
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, first


def batchfit_run(device: torch.device, **options: Any) -> tuple[Trainer, torch.nn.Module]:
    model = llama()
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=LR), batch_size=BATCH, shuffle=False,
                      device=str(device), progress=False, **options)
    trainer.fit(ArraySource(**tokens()), epochs=1)
    return trainer, model


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference of two state dicts, relative to the largest weight (0 for equal)."""
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) / scale


def row(check: str, measured: str, expected: str, ok: bool | None) -> dict[str, str]:
    verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    return {"check": check, "measured": measured, "expected": expected, "verdict": verdict}


# ---------------------------------------------------------------- 1. FSDP over NCCL


def fsdp_rank(device_type: str, out: str) -> dict[str, Any]:
    """One rank of the FSDP run (a child process); rank 0 saves the gathered weights to ``out``."""
    import torch.distributed as dist

    from batchfit.sharding import full_model_state

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    # One GPU: a process group of one rank of our own, so that the sharded step and its collectives run on NCCL.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank,
                            world_size=world)
    try:
        _, model = batchfit_run(device, strategy="fsdp", micro_batch_size=8)
        state = {k: v.float().cpu() for k, v in full_model_state(model).items()}
        if rank == 0:
            torch.save(state, out)
        return {"rank": rank, "backend": dist.get_backend(), "world": world}
    finally:
        dist.destroy_process_group()


def check_fsdp(device: torch.device) -> dict[str, str]:
    ranks = min(2, torch.cuda.device_count()) if device.type == "cuda" else 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    reference, _ = hand_loop(device)
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "fsdp.pt")
        command, env = child_command("gpu_check", "--child", json.dumps(["fsdp_rank", device.type, out]))
        answers = launch_ranks(command, env, ranks, timeout=600.0, what="FSDP check")
        sharded = torch.load(out)
    difference = largest_difference(reference, sharded)
    backend = answers[0]["backend"]
    return row("fsdp_nccl", f"{ranks} rank(s), {backend}: largest weight difference {difference:.1e}",
               "< 1e-4 against the hand loop (fp32)", difference < 1e-4)


# ---------------------------------------------------------------- 2. pinned memory and copies overlapping compute


def check_pinned(device: torch.device, quick: bool) -> dict[str, str]:
    if device.type != "cuda":
        return row("pinned_prefetch", "no CUDA device", "pinned batches; prefetch=2 faster than 0", None)
    from batchfit.core.batch import tensors_of
    from batchfit.data.batcher import Batcher

    rng = np.random.default_rng(0)
    samples = 2048 if quick else 8192
    x = rng.standard_normal((samples, 3, 64, 64), dtype=np.float32)
    y = rng.integers(0, 10, samples)
    batcher = Batcher(ArraySource(x, y), 256, shuffle=False, pin_memory=True)
    pinned = all(t.is_pinned() for t in tensors_of(next(batcher.remaining())))

    def epoch(prefetch: int) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
        trainer = Trainer(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.01),
                          batch_size=256, device=str(device), prefetch=prefetch, progress=False)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        trainer.fit((x, y), epochs=1)
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    epoch(2)  # warm-up: cuDNN's choices, the allocator
    ratios = []
    for repeat in range(3 if quick else 5):
        pair = (epoch(0), epoch(2)) if repeat % 2 == 0 else tuple(reversed((epoch(2), epoch(0))))
        ratios.append(pair[0] / pair[1])
    ratio = statistics.median(ratios)
    return row("pinned_prefetch", f"pinned: {pinned}; epoch time prefetch=0 / prefetch=2: {ratio:.2f}",
               "pinned, ratio > 1", pinned and ratio > 1.0)


# ---------------------------------------------------------------- 3. bf16 autocast with the token-weighted loss


class FirstLoss(Callback):
    """Keeps the loss of the first step."""

    def __init__(self) -> None:
        self.loss = math.nan

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if math.isnan(self.loss):
            self.loss = float(record["loss"])


def check_bf16(device: torch.device) -> dict[str, str]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return row("bf16_token_loss", "bf16 not supported by this device", "", None)
    reference, hand_first = hand_loop(device)
    first = FirstLoss()
    model = llama()
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=LR), batch_size=BATCH, shuffle=False,
                      device=str(device), progress=False, precision="bf16", micro_batch_size=8,
                      callbacks=[first])
    trainer.fit(ArraySource(**tokens()), epochs=1)
    loss_error = abs(first.loss - hand_first) / hand_first
    weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    difference = largest_difference(reference, weights)
    return row("bf16_token_loss", f"first loss {first.loss:.4f} vs fp32 {hand_first:.4f} ({loss_error:.1e}); "
               f"weights after an epoch {difference:.1e}", "loss < 1e-2, weights < 5e-2 relative",
               loss_error < 1e-2 and difference < 5e-2)


# ---------------------------------------------------------------- 4. the memory fit, 5. out of memory


def step_peak(device: torch.device, size: int) -> float:
    """The peak bytes a training step at micro-batch ``size`` allocates on ``device`` (inf if out of memory)."""
    model = llama().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = tokens(size)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        ids = torch.from_numpy(data["input_ids"]).to(device)
        labels = torch.from_numpy(data["labels"]).to(device)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        return float(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return math.inf
    finally:
        del model, optimizer
        torch.cuda.empty_cache()


def check_memory_fit(device: torch.device) -> dict[str, str]:
    if device.type != "cuda":
        return row("memory_fit", "no CUDA device", "peak(found) <= budget < peak(2 x found)", None)
    budget = torch.cuda.get_device_properties(device).total_memory / 4
    model = llama().to(device)
    size = find_micro_batch_size(model, None, ArraySource(**tokens(4096)), device=device, memory_budget=budget,
                                 optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    del model
    torch.cuda.empty_cache()
    fits, twice = step_peak(device, size), step_peak(device, 2 * size)
    gib = 2.0**30
    return row("memory_fit", f"found {size}; peak {fits / gib:.2f} GiB, at {2 * size}: {twice / gib:.2f} GiB; "
               f"budget {budget / gib:.2f} GiB", "peak(found) <= budget < peak(2 x found)",
               fits <= budget < twice)


def check_out_of_memory(device: torch.device) -> dict[str, str]:
    if device.type != "cuda":
        return row("out_of_memory", "no CUDA device", "a batchfit error naming the micro-batch", None)
    huge = 1 << 20  # sequences of SEQ tokens: their logits alone take 128 GiB, past a device's memory
    model = llama()
    data = {k: np.repeat(v[:1], huge, axis=0) for k, v in tokens(1).items()}
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=LR), batch_size=huge, shuffle=False,
                      device=str(device), progress=False)
    try:
        trainer.fit(ArraySource(**data), epochs=1)
        raised = "nothing"
    except BatchfitError as error:
        raised = f"{type(error).__name__}: {str(error)[:120]}"
    except torch.cuda.OutOfMemoryError as error:
        raised = f"torch.cuda.OutOfMemoryError (raw): {str(error)[:80]}"
    finally:
        del trainer, model
        torch.cuda.empty_cache()
    return row("out_of_memory", raised, "a batchfit error", raised.split(":")[0] not in ("nothing",)
               and "raw" not in raised)


# ---------------------------------------------------------------- the table


def checks(device: torch.device, quick: bool) -> list[dict[str, str]]:
    """Every check on ``device``; a check that fails by raising is a FAIL row naming the exception."""
    rows = []
    for name, check in (("fsdp_nccl", lambda: check_fsdp(device)),
                        ("pinned_prefetch", lambda: check_pinned(device, quick)),
                        ("bf16_token_loss", lambda: check_bf16(device)),
                        ("memory_fit", lambda: check_memory_fit(device)),
                        ("out_of_memory", lambda: check_out_of_memory(device))):
        print(f"gpu_check: {name}", file=sys.stderr, flush=True)
        try:
            rows.append(check())
        except Exception as error:  # noqa: BLE001 (the table reports it)
            rows.append(row(name, f"raised {type(error).__name__}: {str(error)[:200]}", "", False))
    return rows


def format_rows(device: torch.device, rows: list[dict[str, str]]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (a dry run of the script)"
    lines = [f"gpu_check on {name}, torch {torch.__version__}:", "", "| check | measured | expected | verdict |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['check']} | {r['measured']} | {r['expected']} | {r['verdict']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child_task(args.child, {"fsdp_rank": fsdp_rank})
        return 0
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (run with --device cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
    rows = checks(device, args.quick)
    print(format_rows(device, rows))
    return 1 if any(r["verdict"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
