"""Keeping what was trained: save, load (also in a fresh process and across torch.compile), the best
epoch's model, and the command line's evaluate and predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.cli import main


def mlp(seed: int = 0, hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))


def trained(classification, **options) -> bf.Trainer:
    model = mlp()
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16,
                         progress=False, **options)
    trainer.fit(classification, epochs=2)
    return trainer


def test_save_and_load_model_predict_the_same(tmp_path, classification):
    trainer = trained(classification)
    path = trainer.save(tmp_path / "model.pt")
    fresh = bf.load_model(path, mlp(seed=5))
    x = torch.from_numpy(classification[0])
    torch.testing.assert_close(fresh(x), trainer.module(x), rtol=0, atol=0)
    saved = torch.load(path, weights_only=True)
    assert saved["config"]["batch_size"] == 16 and saved["format"] == "batchfit-model"


def test_saved_model_reloads_in_a_fresh_process(tmp_path, classification):
    trainer = trained(classification)
    trainer.save(tmp_path / "model.pt")
    np.save(tmp_path / "x.npy", classification[0])
    expected = trainer.predict(classification[0]).numpy()
    code = (f"import sys; sys.path[:0] = {sys.path!r}\n"
            "import numpy as np, torch, batchfit as bf\n"
            "torch.manual_seed(9)\n"
            "model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
            f"bf.load_model({str(tmp_path / 'model.pt')!r}, model)\n"
            f"out = model(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).detach().numpy()\n"
            f"np.save({str(tmp_path / 'out.npy')!r}, out)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_compiled_and_plain_models_save_and_load_the_same(tmp_path):
    plain = mlp()
    compiled = torch.compile(mlp(seed=1))  # not run: compiling needs no call to wrap the module
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    bf.Trainer(plain, F.cross_entropy, torch.optim.SGD(plain.parameters(), lr=0.1)).save(tmp_path / "plain.pt")
    bf.load_model(tmp_path / "plain.pt", compiled)
    for name, value in plain.state_dict().items():
        assert torch.equal(compiled._orig_mod.state_dict()[name], value)
    bf.Trainer(compiled, F.cross_entropy, torch.optim.SGD(compiled.parameters(), lr=0.1)).save(tmp_path / "c.pt")
    assert set(torch.load(tmp_path / "c.pt", weights_only=True)["model"]) == set(plain.state_dict())
    bf.load_model(tmp_path / "c.pt", mlp(seed=2))


def test_load_model_of_another_shape_says_which_weights_and_changes_nothing(tmp_path, classification):
    trained(classification).save(tmp_path / "model.pt")
    other = mlp(seed=3, hidden=8)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(bf.CheckpointError, match=r"holds weights of another model: 0\.weight has shape \(16, 5\)"):
        bf.load_model(tmp_path / "model.pt", other)
    for name, value in other.state_dict().items():
        assert torch.equal(value, before[name])


def test_load_model_reads_a_training_checkpoint(tmp_path, classification):
    trainer = trained(classification, checkpoint_dir=tmp_path / "ckpt")
    loaded = bf.load_model(sorted((tmp_path / "ckpt").glob("step-*.pt"))[-1], mlp(seed=7))
    for name, value in trainer.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_model_checkpoint_keeps_the_best_epoch(tmp_path, classification):
    x, y = classification
    flipped = (x, (y + 1) % 3)  # validation gets worse as training goes on
    best_path = tmp_path / "best.pt"
    snapshots = {}

    class Keep(bf.Callback):
        def on_epoch_end(self, trainer, epoch, record):
            snapshots[epoch] = ({k: v.clone() for k, v in trainer.module.state_dict().items()}, record["val_loss"])

    model = mlp()
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), batch_size=16,
                         progress=False, callbacks=[Keep(), bf.ModelCheckpoint(best_path, monitor="val_loss")])
    trainer.fit((x, y), epochs=4, val=flipped)
    best_epoch = min(snapshots, key=lambda e: snapshots[e][1])
    loaded = bf.load_model(best_path, mlp(seed=4))
    for name, value in snapshots[best_epoch][0].items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_model_checkpoint_refuses_an_unknown_metric(tmp_path, classification):
    model = mlp()
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), progress=False,
                         callbacks=[bf.ModelCheckpoint(tmp_path / "m.pt", monitor="val_f1")])
    with pytest.raises(ValueError, match=r"`monitor` must be a key of the epoch record"):
        trainer.fit(classification, epochs=1, val=classification)


# ---------------------------------------------------------------------------- the command line
def _config(folder: Path, lr: float = 0.1, resume: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    np.savez(folder / "train.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    np.save(folder / "new_x.npy", x[:7])
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
lr = {lr}

[train]
epochs = 2
batch_size = 16
progress = false
checkpoint_dir = "ckpt"
resume = {str(resume).lower()}
out = "{folder / 'runs'}"
""")
    return path


def test_cli_train_writes_the_model_and_evaluate_and_predict_use_it(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["train", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out)
    model_path = Path(summary["model"])
    assert model_path.name == "model.pt" and model_path.is_file()
    assert main(["evaluate", str(config), "--model", str(model_path)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(summary["val_accuracy"])
    out = tmp_path / "pred.npy"
    assert main(["predict", str(config), "--model", str(model_path), "--data", str(tmp_path / "new_x.npy"),
                 "--out", str(out)]) == 0
    assert np.load(out).shape == (7, 2)


def test_cli_second_run_with_another_lr_is_refused_clearly(tmp_path, capsys):
    assert main(["train", str(_config(tmp_path, lr=0.1, resume=True))]) == 0
    capsys.readouterr()
    assert main(["train", str(_config(tmp_path, lr=0.05, resume=True))]) == 2
    assert "written with lrs=[0.1], but this run has lrs=[0.05]" in capsys.readouterr().err


def test_finished_run_resumed_says_there_is_nothing_to_train(tmp_path, classification, capsys):
    model = mlp()
    options = dict(batch_size=16, checkpoint_dir=tmp_path / "ckpt", progress=True)
    bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), **options).fit(
        classification, epochs=1, resume=True)
    model = mlp()
    again = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), **options)
    capsys.readouterr()
    again.fit(classification, epochs=1, resume=True)
    assert "had already finished 1 of 1 epochs: nothing to train" in capsys.readouterr().err
