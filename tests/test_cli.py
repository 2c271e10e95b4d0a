"""The command line: demo, train from a TOML file, shards, errors that name the key."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from batchfit.cli import main


def _write_data(folder: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(folder / "train.npz", x=x, y=y)


def _config(folder: Path, extra: str = "") -> Path:
    path = folder / "run.toml"
    path.write_text(f"""
[data]
train = "train.npz"
val_split = 0.25

[model]
name = "mlp"
args = {{ hidden = [16] }}

[optimizer]
name = "sgd"
lr = 0.1

[train]
epochs = 2
batch_size = 16
micro_batch_size = 8
progress = false
out = "{folder / 'runs'}"
{extra}
""")
    return path


def test_cli_train_writes_run_folder(tmp_path, capsys):
    _write_data(tmp_path)
    assert main(["train", str(_config(tmp_path))]) == 0
    summary = json.loads(capsys.readouterr().out)
    run_dir = Path(summary["run_dir"])
    assert summary["epoch"] == 2 and 0.0 <= summary["val_accuracy"] <= 1.0
    for name in ("metrics.csv", "epochs.csv", "curves.png", "summary.json", "run.toml"):
        assert (run_dir / name).stat().st_size > 0, name
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,samples,batch_size,loss,lr,seconds")
    assert len(lines) == 1 + summary["steps"]


def test_cli_train_resume_continues_from_checkpoint(tmp_path, capsys):
    _write_data(tmp_path)
    config = _config(tmp_path, 'checkpoint_dir = "ckpt"\nresume = true')
    assert main(["train", str(config), "--epochs", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["train", str(config), "--epochs", "2"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["steps"] == 2 * first["steps"]  # the second run trained only the missing epoch
    assert (tmp_path / "ckpt").is_dir()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("bacth_size = 3", r"unknown key `train.bacth_size`"),
        ('epochs = "two"', r"`train.epochs` must be int. Received: train.epochs='two'"),
        ("batch_size = 0", r"`batch_size` must be a positive integer, 'full', 'auto' or 'adaptive'. Received: "),
    ],
)
def test_cli_train_bad_config_names_the_key(tmp_path, capsys, extra, message):
    _write_data(tmp_path)
    text = _config(tmp_path).read_text().replace("batch_size = 16\n", "") if "batch_size" in extra else \
        _config(tmp_path).read_text().replace("epochs = 2\n", "")
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("[train]\n", f"[train]\n{extra}\n"))
    assert main(["train", str(path)]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_cli_unknown_section_refused(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\ntrain = 'x.npz'\n[trainer]\nepochs = 1\n")
    assert main(["train", str(path)]) == 2
    assert "unknown section [trainer]" in capsys.readouterr().err


def test_cli_shards_write_and_verify(tmp_path, capsys):
    _write_data(tmp_path)
    assert main(["shards", "write", str(tmp_path / "train.npz"), str(tmp_path / "shards")]) == 0
    assert "wrote 120 samples" in capsys.readouterr().out
    assert main(["shards", "verify", str(tmp_path / "shards")]) == 0
    assert "checksums" in capsys.readouterr().out


def test_cli_demo_short_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy 0." in out
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "curves.png").exists() and (run_dir / "metrics.csv").exists()


def test_cli_tune_prints_recommendation_and_writes_report(tmp_path, capsys):
    _write_data(tmp_path)
    config = _config(tmp_path, "").read_text() + f"""
[tune]
batch_sizes = [8, 16]
epochs = 1
out = "{tmp_path / 'tune'}"
"""
    path = tmp_path / "tune.toml"
    path.write_text(config.replace("micro_batch_size = 8\n", ""))
    assert main(["tune", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recommended batch_size=" in out and "lr=" in out
    report_dir = next((tmp_path / "tune").iterdir())
    for name in ("report.md", "report.json", "sweep.png", "lr_range.png", "throughput.png"):
        assert (report_dir / name).exists(), name


def test_cli_train_with_a_schedule_and_callbacks_from_the_config(tmp_path, capsys):
    _write_data(tmp_path)
    config = _config(tmp_path, extra='\n[schedule]\nname = "StepLR"\nargs = { step_size = 2, gamma = 0.5 }\n'
                                   '\n[callbacks]\nearly_stopping = { monitor = "val_loss", patience = 5 }\n'
                                   'model_checkpoint = { path = "best.pt", monitor = "val_accuracy" }\n')
    assert main(["train", str(config)]) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    lrs = [float(line.split(",")[5]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert lrs[:4] == [0.1, 0.1, 0.05, 0.05]
    assert (tmp_path / "best.pt").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    ('\n[schedule]\nname = "Cosine"\n', r"`schedule.name` must be a scheduler of torch.optim.lr_scheduler"),
    ('\n[schedule]\nname = "StepLR"\nargs = { gamma = 0.5 }\n', r"`schedule.args` do not fit 'StepLR'"),
    ('\n[callbacks]\nearly_stopping = { patience = -1 }\n', r"`callbacks.early_stopping`: `patience` must be"),
])
def test_cli_bad_schedule_or_callbacks_name_the_key(tmp_path, capsys, extra, message):
    _write_data(tmp_path)
    assert main(["train", str(_config(tmp_path, extra=extra))]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_default_threads_is_half_the_cores_or_omp_num_threads(monkeypatch):
    import os

    from batchfit.cli import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_threads() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


def test_cli_threads_flag_sets_torch_threads(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    _write_data(tmp_path)
    try:
        assert main(["train", str(_config(tmp_path)), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cli_train_reads_a_shard_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "all.npz", x=x, y=y)
    assert main(["shards", "write", str(tmp_path / "all.npz"), str(tmp_path / "train_shards")]) == 0
    np.savez(tmp_path / "val.npz", x=x[:30], y=y[:30])
    config = tmp_path / "run.toml"
    config.write_text(f"""
[data]
train = "train_shards"
val = "val.npz"

[model]
name = "mlp"

[train]
epochs = 2
batch_size = 16
progress = false
out = "{tmp_path / 'runs'}"
""")
    capsys.readouterr()
    assert main(["train", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 16 and 0 <= summary["val_accuracy"] <= 1


def test_cli_train_with_metrics_from_the_config(tmp_path, capsys):
    _write_data(tmp_path)
    (tmp_path / "my_metrics.py").write_text(
        "import torch\n"
        "def positive_rate(output, target):\n"
        "    return (output.argmax(-1) == 1).float().mean()\n"
        "class Count:\n"
        "    def reset(self): self.n = 0\n"
        "    def update(self, output, target): self.n += len(target)\n"
        "    def compute(self): return self.n\n")
    config = _config(tmp_path, extra='\n[metrics]\npositive_rate = "my_metrics:positive_rate"\n'
                                   'count = "my_metrics:Count"\n')
    assert main(["train", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["val_positive_rate"] <= 1 and summary["val_count"] == 30


def test_cli_bench_prints_its_two_groups_with_the_thread_count(capsys, monkeypatch):
    import torch

    import batchfit.bench as bench

    row = bench.Row("Trainer.fit, batch 32", "hand-written loop, batch 32", 100.0, 100.0, 1.0, ">=0.97")
    calls = []
    monkeypatch.setattr(bench, "data_path_rows", lambda **kwargs: calls.append(("data", kwargs)) or [])
    monkeypatch.setattr(bench, "step_overhead_rows", lambda **kwargs: calls.append(("train", kwargs)) or [row])
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert [name for name, _ in calls] == ["data", "train"]
    assert "(quick;" in out and "1 torch thread(s)" in out
    assert "Trainer.fit, batch 32" in out and "ok" in out


def test_cli_prints_a_message_shown_under_the_progress_bar_once():
    from batchfit.cli import not_shown

    record = logging.LogRecord("batchfit", logging.INFO, __file__, 1, "Resumed from ckpt", None, None)
    assert not_shown(record)
    record.shown = True  # the trainer wrote it under its progress bar already
    assert not not_shown(record)


@pytest.mark.parametrize("argv, words", [
    (["--nnodes", "0"], "1 <= MIN <= MAX"),
    (["--nnodes", "3:2"], "1 <= MIN <= MAX"),
    (["--nnodes", "a:2"], "N or MIN:MAX"),
    (["--nnodes", "1:2:3"], "N or MIN:MAX"),
    (["--rdzv-endpoint", "127.0.0.1"], "HOST:PORT"),
    (["--rdzv-endpoint", "host:70000"], "1 to 65535"),
    (["--rdzv-endpoint", ":29500"], "HOST:PORT"),
    (["--rdzv-conf", "last_call_timeout"], "KEY=VALUE"),
    (["--rdzv-id", "two words"], "without spaces"),
])
def test_train_refuses_bad_machine_options(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "run.toml", *argv])
    assert stop.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--nnodes", "2"], "needs `--rdzv-endpoint HOST:PORT`"),
    (["--nnodes", "1:4"], "needs `--rdzv-endpoint HOST:PORT`"),
    (["--nproc", "2", "--rdzv-conf", "join_timeout=60"], "`--rdzv-conf` needs `--rdzv-endpoint"),
])
def test_train_on_several_machines_needs_an_endpoint(argv, words, capsys):
    assert main(["train", "run.toml", *argv]) == 2
    assert words in capsys.readouterr().err


def test_train_launch_command_passes_the_rendezvous_to_torchrun():
    from batchfit.cli import _parser, launch_command

    def command(*argv: str) -> list[str]:
        full = launch_command(_parser().parse_args(["train", "run.toml", *argv]))
        return full[full.index("torch.distributed.run") + 1:full.index("-m", 3)]

    assert command("--nproc", "2") == ["--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    assert command("--nnodes", "1:2", "--rdzv-endpoint", "10.0.0.1:29400", "--max-restarts", "3",
                   "--rdzv-conf", "last_call_timeout=5") == [
        "--nnodes=1:2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=batchfit",
        "--rdzv-conf=last_call_timeout=5", "--nproc-per-node=1", "--max-restarts=3"]
    assert command("--nnodes", "2", "--rdzv-endpoint", "[::1]:29400", "--rdzv-id", "job7")[:4] == [
        "--nnodes=2:2", "--rdzv-backend=c10d", "--rdzv-endpoint=[::1]:29400", "--rdzv-id=job7"]
