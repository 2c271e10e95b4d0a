"""The text recipe through configs: `[model] name = "text"`, `[loss] name = "model"`, token shards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from batchfit.cli import main
from batchfit.config import build_loss, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_text_recipe_config_is_valid() -> None:
    config = load_config(EXAMPLES / "finetune_text.toml")
    assert config["model"]["name"] == "text"
    assert config["model"]["args"]["task"] == "classification"
    assert build_loss(config) is None  # the model's own loss
    assert config["train"]["micro_batch_tokens"] == 512 and config["train"]["shuffle"] == "length"


def test_text_recipe_trains_minilm_from_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [["text", "label"]] + [[f"{w} tastes {w} and {w}", "food"] for w in ("bread", "soup", "cake", "rice")] \
        + [[f"the {w} court ruled on the {w} case", "law"] for w in ("high", "state", "county", "federal")]
    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    for name in ("train", "val"):
        extra = ["--classes-from", str(tmp_path / "train")] if name == "val" else []
        assert main(["shards", "write", str(tmp_path / "data.csv"), str(tmp_path / name), "--tokenizer", "minilm",
                     "--label-column", "label", "--max-length", "16", *extra]) == 0
    text = (EXAMPLES / "finetune_text.toml").read_text()
    text = text.replace('"data/text/train"', '"train"').replace('"data/text/val"', '"val"')
    text = text.replace('name_or_path = "smollm2"', 'name_or_path = "minilm"').replace('lora_rank = 8', 'lora_rank = 2')
    text = text.replace('out = "runs"', f'out = "{tmp_path / "runs"}"')
    (tmp_path / "text.toml").write_text(text)
    torch_threads = torch.get_num_threads()
    try:
        assert main(["train", str(tmp_path / "text.toml"), "--epochs", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 1 and summary["samples"] == 8
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["val_loss"] > 0
    assert Path(summary["model"]).is_file()


def test_text_recipe_script_runs_end_to_end(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_text.py"), "--model", "minilm", "--lora-rank", "0", "--corpus",
         "fortunes", "--train-samples", "32", "--max-length", "24", "--epochs", "1", "--data", str(tmp_path / "data"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before: val_loss" in done.stdout and "epoch 1: loss" in done.stdout and "val_accuracy" in done.stdout
    assert (tmp_path / "out" / "model.pt").is_file()
    assert (tmp_path / "data" / "train" / "manifest.json").is_file()
