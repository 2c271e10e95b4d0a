"""What users bring: torchmetrics-style metrics, predict on dict outputs and several inputs, pandas
and lists as data, uint8 images with ToFloat, and the mistakes that used to end in raw errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf


def mlp(out: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, out))


def trainer_for(model: torch.nn.Module, **options) -> bf.Trainer:
    options.setdefault("progress", False)
    return bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=10, **options)


class MacroF1:
    """F1 of class 1 over the whole set: update / compute / reset, as torchmetrics objects have."""

    def reset(self):
        self.tp = self.fp = self.fn = 0

    def update(self, output, target):
        predicted = output.argmax(dim=-1)
        self.tp += int(((predicted == 1) & (target == 1)).sum())
        self.fp += int(((predicted == 1) & (target != 1)).sum())
        self.fn += int(((predicted != 1) & (target == 1)).sum())

    def compute(self):
        return 2 * self.tp / max(1, 2 * self.tp + self.fp + self.fn)


def test_stateful_metric_is_computed_over_the_whole_set(classification):
    trainer = trainer_for(mlp(), metrics={"f1": MacroF1()})
    trainer.fit(classification, epochs=1)
    values = {size: trainer.evaluate(classification, batch_size=size)["f1"] for size in (3, 7, 100)}
    x, y = classification
    reference = MacroF1()
    reference.reset()
    with torch.no_grad():
        reference.update(trainer.module(torch.from_numpy(x)), torch.from_numpy(y))
    assert values[3] == values[7] == values[100] == pytest.approx(reference.compute())


def test_predict_on_a_dict_output_model():
    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(5, 3)

        def forward(self, x, labels=None):
            logits = self.layer(x)
            return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}

    model = DictOut()
    trainer = bf.Trainer(model, None, torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    x = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    predicted = trainer.predict({"x": x}, batch_size=5)
    torch.testing.assert_close(predicted, model.layer(torch.from_numpy(x)).detach())


def test_predict_on_a_two_input_model_with_targets_false():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 3), torch.nn.Linear(2, 3)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    model = TwoInputs()
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    rng = np.random.default_rng(0)
    x, z = rng.standard_normal((9, 5)).astype(np.float32), rng.standard_normal((9, 2)).astype(np.float32)
    expected = model(torch.from_numpy(x), torch.from_numpy(z)).detach()
    torch.testing.assert_close(trainer.predict((x, z), targets=False, batch_size=4), expected)
    y = np.zeros(9, dtype=np.int64)
    torch.testing.assert_close(trainer.predict((x, z, y), batch_size=4), expected)  # the training convention


def test_pandas_and_lists_work_as_data(classification):
    pd = pytest.importorskip("pandas")
    x, y = classification
    from_numpy = trainer_for(mlp())
    from_numpy.fit((x, y), epochs=1)
    from_pandas = trainer_for(mlp())
    from_pandas.fit((pd.DataFrame(x), pd.Series(y)), epochs=1)
    from_lists = trainer_for(mlp())
    from_lists.fit((x.tolist(), y.tolist()), epochs=1)
    for name, value in from_numpy.module.state_dict().items():
        torch.testing.assert_close(from_pandas.module.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(from_lists.module.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(from_pandas.predict(pd.DataFrame(x)), from_numpy.predict(x))


def test_uint8_images_train_with_to_float(classification):
    x, y = classification
    images = np.clip(x * 40 + 128, 0, 255).astype(np.uint8)
    with pytest.raises(bf.BatchfitError, match=r"the inputs are integers \(byte\) but the model computes in "
                                               r"float: convert them, e.g. transform=bf.ToFloat\(\)"):
        trainer_for(mlp()).fit((images, y), epochs=1)
    trainer = trainer_for(mlp(), transform=bf.ToFloat(mean=0.5, std=0.25))
    trainer.fit((images, y), epochs=1)
    reference = trainer_for(mlp())
    reference.fit(((images.astype(np.float32) / 255 - 0.5) / 0.25, y), epochs=1)
    for name, value in reference.module.state_dict().items():
        torch.testing.assert_close(trainer.module.state_dict()[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_labels_of_the_wrong_dtype_for_cross_entropy_say_how_to_fix(classification, dtype):
    x, y = classification
    name = np.dtype(dtype).name.replace("32", "")
    with pytest.raises(bf.BatchfitError, match=rf"step 1 \(epoch 1\): the labels are {name}, but cross-entropy "
                                               rf"needs class indices \(int64\): pass y.astype\('int64'\)"):
        trainer_for(mlp()).fit((x, y.astype(dtype)), epochs=1)


def test_plain_model_with_dict_data_says_how_to_fix(classification):
    x, y = classification
    with pytest.raises(bf.BatchfitError, match=r"the model takes no argument 'features': dict batches are passed "
                                               r"as model\(\*\*batch\)"):
        trainer_for(mlp()).fit({"features": x, "labels": y}, epochs=1)


def test_demo_refuses_bad_arguments_and_names_only_files_it_wrote(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from batchfit.cli import main

    assert main(["demo", "--lr", "-1", "--out", str(tmp_path)]) == 2
    assert "`lr` must be a positive learning rate. Received: lr=-1.0" in capsys.readouterr().err
    assert main(["demo", "--epochs", "0", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "curves.png" not in out and "summary.json" in out


class TokenModel(torch.nn.Module):
    """Takes input_ids and an attention mask and **kwargs (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 4)
        self.head = torch.nn.Linear(4, 2)
        self.masks = []

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        assert not kwargs, f"unexpected {sorted(kwargs)}"
        self.masks.append(attention_mask)
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return self.head(pooled)


def test_ragged_lengths_become_the_attention_mask_not_a_keyword(tmp_path):
    ids = [np.arange(1, 1 + n) % 20 for n in (3, 5, 2, 4)]
    source = bf.write_shards(tmp_path / "tokens", {"input_ids": ids, "labels": np.array([0, 1, 0, 1])})
    model = TokenModel()
    trainer = bf.Trainer(model, lambda out, batch: F.cross_entropy(out, batch["labels"]),
                         torch.optim.SGD(model.parameters(), lr=0.1), batch_size=4, shuffle=False, progress=False)
    trainer.fit(source, epochs=1)
    mask = model.masks[0]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
