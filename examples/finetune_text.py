"""Fine-tune a pretrained language model on real text, offline, on a CPU: raw text to a classifier.

    python examples/finetune_text.py                     # SmolLM2-135M + LoRA, fine-food reviews
    python examples/finetune_text.py --model minilm --lora-rank 0      # MiniLM, every weight trained
    python examples/finetune_text.py --corpus fortunes --train-samples 2000 --epochs 3   # scale up
    python examples/finetune_text.py --prepare-only      # only the shards finetune_text.toml reads
    python examples/finetune_text.py --task causal_lm --corpus fortunes   # language modelling: perplexity

Steps: (1) the corpus as CSV files (text, label), (2) tokenised once with the model's own
tokenizer into ragged token shards, (3) the pretrained model with a new classification head
(and LoRA adapters), (4) bf.Trainer: batches of ``--batch-size`` reviews, cut into micro-batches
of at most ``--micro-batch-tokens`` padded tokens after sorting by length, validation accuracy
after each epoch (``--task causal_lm``: the texts themselves are learnt, the loss is the exact
mean over their tokens, and validation perplexity is reported). The defaults take a few minutes
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import batchfit as bf
from batchfit.data.text import load_tokenizer, write_text_shards
from batchfit.workloads.text import CORPORA, TASKS, load_text_model, prepare_corpus, trainable_parameters

HERE = Path(__file__).resolve().parent


def prepare(args: argparse.Namespace) -> tuple[bf.ShardSource, bf.ShardSource]:
    """The corpus as CSV, then tokenised into ``data/text/{train,val}`` shard folders (``data/text_lm``
    for a language model)."""
    folder = Path(args.data) if args.data else HERE / "data" / ("text" if args.task == "classification" else "text_lm")
    csvs = prepare_corpus(args.corpus, folder / "csv", limit=args.train_samples, seed=args.seed)
    tokenizer = load_tokenizer(args.model)
    label = "label" if args.task == "classification" else None  # a causal LM learns the texts themselves
    train = write_text_shards(csvs["train"], folder / "train", tokenizer, label_column=label,
                              max_length=args.max_length, overwrite=True, progress=True)
    val = write_text_shards(csvs["val"], folder / "val", tokenizer, label_column=label, max_length=args.max_length,
                            classes=train.classes, overwrite=True, progress=True)
    for name, source in (("train", train), ("val", val)):
        counts = source.metadata["counts"]
        print(f"{name}: {counts['samples']} texts, {counts['tokens']:,} tokens, {counts['truncated']} cut to "
              f"{args.max_length}")
    return train, val


def describe(metrics: dict[str, float], task: str) -> str:
    """Validation accuracy for a classifier, perplexity (exp of the token-mean loss) for a language model."""
    if task == "classification":
        return f"val_loss {metrics['loss']:.4f}, val_accuracy {metrics['accuracy']:.3f}"
    return f"val_loss {metrics['loss']:.4f}, val_perplexity {math.exp(metrics['loss']):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, minilm, a local folder or .gguf file")
    parser.add_argument("--task", default="classification", choices=TASKS)
    parser.add_argument("--corpus", default="fine_food", choices=CORPORA)
    parser.add_argument("--train-samples", type=int, default=256, help="a seeded subset (validation: a fifth as many)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens kept of each text")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="texts per weight update")
    parser.add_argument("--micro-batch-tokens", type=int, default=512, help="padded tokens per forward pass")
    parser.add_argument("--lora-rank", type=int, default=8, help="0: train every weight")
    parser.add_argument("--lr", type=float, help="default: 1e-3 with LoRA, 5e-5 without")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about 30%% more time")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "runs" / "text"), help="where the model is saved")
    parser.add_argument("--data", help="folder for the CSV files and shards (default: examples/data/text, "
                        "or text_lm for --task causal_lm)")
    parser.add_argument("--prepare-only", action="store_true", help="write the shards and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    train, val = prepare(args)
    if args.prepare_only:
        return
    torch.manual_seed(args.seed)
    model = load_text_model(args.model, args.task, classes=train.classes, lora_rank=args.lora_rank or None,
                            gradient_checkpointing=args.gradient_checkpointing)
    trainable, total = trainable_parameters(model)
    print(f"{args.model}: {total / 1e6:.1f} M parameters, {trainable / 1e6:.2f} M trained "
          f"(ready after {time.perf_counter() - start:.0f} s)")
    lr = args.lr if args.lr is not None else (1e-3 if args.lora_rank else 5e-5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    trainer = bf.Trainer(model, None, optimizer, batch_size=args.batch_size, micro_batch_tokens=args.micro_batch_tokens,
                         shuffle="length", progress=True, seed=args.seed)  # a bar: an epoch takes minutes
    print(f"before: {describe(trainer.evaluate(val), args.task)}")
    history = trainer.fit(train, epochs=args.epochs, val=val)
    elapsed = 0.0
    for epoch in history.epochs:  # (`seconds` counts from the start of fit)
        shown = describe({k[len("val_"):]: v for k, v in epoch.items() if k.startswith("val_")}, args.task)
        print(f"epoch {epoch['epoch']}: loss {epoch['loss']:.4f}, {shown} ({epoch['seconds'] - elapsed:.0f} s)")
        elapsed = epoch["seconds"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    trainer.save(Path(args.out) / "model.pt")
    print(f"saved {Path(args.out) / 'model.pt'}; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
