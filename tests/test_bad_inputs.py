"""Bad input, everywhere: every case is refused before work starts with a batchfit error (a
``ValueError``) that names the argument or config key, what was expected and what was received.

Three tables — the Python API, run configurations and the command line — each row a bad input
and the message it must produce.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.cli import main
from batchfit.config import load_config

X = np.random.default_rng(0).standard_normal((40, 5)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 3, 40)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def trainer(**options):
    net = model()
    optimizer = options.pop("optimizer", None) or torch.optim.SGD(net.parameters(), lr=0.1)
    loss = options.pop("loss_fn", F.cross_entropy)
    options.setdefault("progress", False)
    return bf.Trainer(net, loss, optimizer, **options)


def fit(data=(X, Y), **options):
    return trainer(batch_size=8, **options).fit(data, epochs=1)


def sgd_with(lr):
    net = model()
    return bf.Trainer(net, F.cross_entropy, torch.optim.SGD(net.parameters(), lr=lr), progress=False)


# ---------------------------------------------------------------------------- the Python API
API = {
    "loss is not a scalar": (lambda: fit(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")),
                             r"`loss_fn` must return a scalar tensor.*Received: a tensor of shape \(8,\)"),
    "loss is not a tensor": (lambda: fit(loss_fn=lambda out, y: 1.0),
                             r"`loss_fn` must return a scalar tensor.*Received: 1\.0"),
    "labels out of range": (lambda: fit((X, Y + 5)),
                            r"step 1 \(epoch 1\): Target \d+ is out of bounds\. The targets must be class indices"),
    "one callback not in a list": (lambda: trainer(callbacks=bf.EarlyStopping()),
                                   r"`callbacks` must be a list of batchfit Callback objects \(wrap a single one"),
    "callbacks of another kind": (lambda: trainer(callbacks=[print]),
                                  r"`callbacks` must be a sequence of batchfit Callback objects"),
    "checkpoint_dir a number": (lambda: trainer(checkpoint_dir=5),
                                r"`checkpoint_dir` must be a folder path \(str or os.PathLike\) or None\. "
                                r"Received: checkpoint_dir=5"),
    "metrics a string": (lambda: trainer(metrics="acc"),
                         r"`metrics` must be a dict of name -> f\(output, target\)\. Received: metrics='acc'"),
    "transform not callable": (lambda: trainer(transform=3), r"`transform` must be a callable or None"),
    "lr_schedule not callable": (lambda: trainer(lr_schedule="cosine"),
                                 r"`lr_schedule` must be a callable step -> factor, a torch lr scheduler, or None"),
    "loss_count not callable": (lambda: trainer(loss_count=1), r"`loss_count` must be a callable or None"),
    "max_grad_norm nan": (lambda: trainer(max_grad_norm=float("nan")),
                          r"`max_grad_norm` must be a positive number or None\. Received: max_grad_norm=nan"),
    "lr nan": (lambda: sgd_with(float("nan")), r"learning rates that are finite and not negative.*lr=nan"),
    "lr inf": (lambda: sgd_with(float("inf")), r"learning rates that are finite and not negative.*lr=inf"),
    "lr negative": (lambda: _negative_lr(),
                    r"learning rates that are finite and not negative.*lr=-0\.1"),
    "schedule gives nan": (lambda: fit(lr_schedule=lambda step: float("nan")),
                           r"`lr_schedule` must return a finite, non-negative factor\. Received: lr_schedule\(0\)=nan"),
    "schedule gives a negative factor": (lambda: fit(lr_schedule=lambda step: -1.0),
                                         r"lr_schedule\(0\)=-1\.0"),
    "train is a path": (lambda: trainer().fit("data/train.npz"),
                        r"`train` must be data, not a path: open a shard folder with bf\.ShardSource\(path\)"),
    "val is a path (refused before training)": (lambda: trainer().fit((X, Y), val="val.npz"),
                                                r"`val` must be data, not a path"),
    "save_checkpoint before fit": (lambda: trainer(checkpoint_dir="unused-ckpt").save_checkpoint(),
                                   r"save_checkpoint\(\) saves a run: call fit\(\) first"),
    "unknown option": (lambda: trainer(batchsize=8), r"`batchsize` is not an option of Trainer"),
    "options and keywords": (lambda: trainer(options=bf.TrainerOptions(), batch_size=4),
                             r"either as `options=` or as keywords, not both"),
    "optimizer over another model": (
        lambda: bf.Trainer(model(), F.cross_entropy, torch.optim.SGD(model().parameters(), lr=0.1)),
        r"`optimizer` must be an optimizer over the model's parameters"),
    "tune make_model not callable": (lambda: bf.tune(5, F.cross_entropy, lambda m: None, (X, Y)),
                                     r"`make_model` must be a callable that builds a fresh one\. "
                                     r"Received: make_model=5"),
    "tune batch_sizes of strings": (lambda: bf.tune(model, F.cross_entropy, lambda m: None, (X, Y),
                                                    batch_sizes=["a"]),
                                    r"`batch_sizes` must be a positive integer\. Received: batch_sizes='a'"),
    "string array": (lambda: bf.ArraySource(np.array(["a", "b"]), np.zeros(2)),
                     r"`arrays\[0\]` must be a numeric array\. Received: .*dtype <U1"),
    "datetime array": (lambda: bf.ArraySource(np.array(["2020-01-01"], dtype="datetime64[D]"), np.zeros(1)),
                       r"must be a numeric array\. Received: .*datetime64"),
    "write_shards metadata": (lambda: bf.write_shards("never-written", (X, Y), metadata={"a": object()}),
                              r"`metadata` must be a JSON-able mapping"),
    "write_shards overwrite": (lambda: bf.write_shards("never-written", (X, Y), overwrite="no"),
                               r"`overwrite` must be True or False\. Received: overwrite='no'"),
    "resume a string": (lambda: trainer(checkpoint_dir="unused-ckpt").fit((X, Y), resume="yes"),
                        r"`resume` must be False, True or 'force'"),
    "precision of a probe": (lambda: bf.lr_range_test(model(), F.cross_entropy, torch.optim.SGD(model().parameters()),
                                                      (X, Y), precision="fp8"),
                             r"`precision` must be one of 'fp32', 'bf16', 'fp16'\. Received: precision='fp8'"),
}


def _negative_lr():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.param_groups[0]["lr"] = -0.1  # torch refuses it in the constructor, not afterwards
    return bf.Trainer(net, F.cross_entropy, optimizer)


@pytest.mark.parametrize("case", sorted(API))
def test_bad_input_api_is_refused_clearly(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing written by a case lands in the repository
    run, message = API[case]
    with pytest.raises(bf.BatchfitError, match=message):
        run()
    assert not (tmp_path / "never-written").exists()


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(bf.BatchfitError, match=r"`checkpoint_dir` must be a folder .* which is a file"):
        trainer(checkpoint_dir=tmp_path / "file")


def test_model_error_inside_a_step_names_the_step():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.layer(x[:, :4])  # a shape bug of the user's

    net = Broken()
    with pytest.raises(RuntimeError, match="mat1 and mat2") as raised:
        bf.Trainer(net, F.cross_entropy, torch.optim.SGD(net.parameters(), lr=0.1), batch_size=8,
                   progress=False).fit((X, Y), epochs=1)
    assert "batchfit: raised during step 1 (epoch 1)" in getattr(raised.value, "__notes__", [])


# ---------------------------------------------------------------------------- run configurations
BASE = """
[data]
train = "train.npz"

[model]
name = "mlp"

[train]
progress = false
"""

CONFIGS = {
    "unknown section": ("[trian]\nepochs = 1\n", r"unknown section \[trian\]"),
    "unknown key": ("[train]\nepoch = 1\n", r"unknown key `train.epoch`"),
    "wrong type": ("[train]\nbatch_size = 1.5\n", r"`train.batch_size` must be int or str"),
    "bad batch mode": ("[train]\nbatch_size = \"huge\"\n",
                       r"\[train\] `batch_size` must be a positive integer, 'full', 'auto' or 'adaptive'"),
    "bad precision": ("[train]\nprecision = \"fp8\"\n", r"\[train\] `precision` must be one of"),
    "workers negative": ("[train]\nworkers = -1\n", r"\[train\] `workers` must be a non-negative integer"),
    "rollback without folder": ("[train]\non_nan = \"rollback\"\n", r"`checkpoint_dir` must be a folder when"),
    "batch_sizes of strings": ("[tune]\nbatch_sizes = [\"a\"]\n",
                               r"`tune.batch_sizes` must be a list of positive integers"),
    "out is a file": ("[train]\nout = \"train.npz\"\n", r"`train.out` must be a folder for run folders"),
}


def _write_config(folder: Path, text: str) -> Path:
    np.savez(folder / "train.npz", x=X, y=Y)
    path = folder / "run.toml"
    sections: dict[str, str] = {}
    for block in (BASE + "\n" + text).split("\n["):
        name, _, body = block.strip().lstrip("[").partition("]")
        if name:
            sections[name] = sections.get(name, "") + body
    path.write_text("".join(f"[{name}]{body}\n" for name, body in sections.items()))
    return path


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_is_refused_naming_the_key(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `out` is relative to the working folder
    text, message = CONFIGS[case]
    with pytest.raises(bf.ConfigError, match=message):
        load_config(_write_config(tmp_path, text))


def test_binary_config_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(bf.ConfigError, match=r"is not valid TOML"):
        load_config(path)


def test_missing_npy_in_a_config_table_names_the_file(tmp_path):
    path = _write_config(tmp_path, "")
    path.write_text(path.read_text().replace('train = "train.npz"', 'train = { x = "x.npy", y = "y.npy" }'))
    from batchfit.config import load_train_val

    with pytest.raises(bf.ConfigError, match=r"`data.train`: data file not found: .*x\.npy"):
        load_train_val(load_config(path))


def test_model_module_that_raises_at_import_is_named(tmp_path):
    (tmp_path / "broken_model.py").write_text("raise RuntimeError('no GPU here')\n")
    path = _write_config(tmp_path, "")
    path.write_text(path.read_text().replace('name = "mlp"', 'name = "broken_model:build"'))
    from batchfit.run import build_run

    with pytest.raises(bf.ConfigError, match=r"importing 'broken_model' raised RuntimeError: no GPU here"):
        build_run(load_config(path))


def test_model_module_next_to_the_config_is_found(tmp_path):
    (tmp_path / "my_model.py").write_text("import torch\n"
                                          "def build(in_features, classes=3):\n"
                                          "    return torch.nn.Linear(in_features, classes)\n")
    path = _write_config(tmp_path, "[model]\nargs = { in_features = 5 }\n")
    path.write_text(path.read_text().replace('name = "mlp"', 'name = "my_model:build"'))
    from batchfit.run import build_run

    trainer_, _, _ = build_run(load_config(path))
    assert isinstance(trainer_.module, torch.nn.Linear)


# ---------------------------------------------------------------------------- the command line
def test_cli_shards_write_existing_output_suggests_overwrite(tmp_path, capsys):
    np.save(tmp_path / "x.npy", X)
    assert main(["shards", "write", str(tmp_path / "x.npy"), str(tmp_path / "out")]) == 0
    assert main(["shards", "write", str(tmp_path / "x.npy"), str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["shards", "write", str(tmp_path / "x.npy"), str(tmp_path / "out"), "--overwrite"]) == 0


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("batchfit ")
