"""Trainer features: evaluation, prediction, metrics, history, callbacks, progress, lr, precision, clipping,
and the kinds of data and models fit accepts."""

import copy
import csv
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit import ArraySource, Callback, DatasetSource, EarlyStopping, History, Trainer


def sgd_trainer(model, loss_fn=F.cross_entropy, lr=0.1, **options):
    options.setdefault("progress", False)
    return Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=lr), **options)


def hand_sgd(model, batches, loss_fn=F.cross_entropy, lr=0.1, epochs=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for *inputs, target in batches:
            loss_fn(model(*inputs), target).backward()
            optimizer.step()
            optimizer.zero_grad()


def in_order(x, y, batch_size):
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    return [(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)]


# ---------------------------------------------------------------------------- evaluate and predict
def test_evaluate_returns_loss_and_accuracy(make_mlp, classification):
    x, y = map(torch.from_numpy, classification)
    model = make_mlp()
    trainer = sgd_trainer(model, eval_batch_size=30)  # batches of 30, 30, 30, 10: the mean is over samples
    result = trainer.evaluate((x, y))
    with torch.no_grad():
        logits = model(x)
    assert result.keys() == {"loss", "accuracy"}
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_evaluate_without_class_targets_has_no_accuracy(make_mlp, regression):
    x, y = map(torch.from_numpy, regression)
    model = make_mlp(out_features=1)
    result = sgd_trainer(model, F.mse_loss).evaluate((x, y), batch_size=8)
    assert set(result) == {"loss"}
    assert result["loss"] == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-6)


def test_evaluate_user_metrics_are_sample_weighted(make_mlp, regression):
    x, y = map(torch.from_numpy, regression)
    model = make_mlp(out_features=1)
    trainer = sgd_trainer(model, F.mse_loss, metrics={"mae": lambda out, target: (out - target).abs().mean()})
    result = trainer.evaluate((x, y), batch_size=10)  # 37 samples: the last batch holds 7
    with torch.no_grad():
        assert result["mae"] == pytest.approx((model(x) - y).abs().mean().item(), rel=1e-6)


def test_evaluate_and_predict_leave_training_mode_and_weights_alone(make_mlp, classification):
    model = make_mlp(dropout=0.5)
    before = copy.deepcopy(model.state_dict())
    trainer = sgd_trainer(model)
    first = trainer.predict(classification)
    assert torch.equal(first, trainer.predict(classification))  # dropout off while predicting
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_predict_keeps_the_order_of_the_samples(make_mlp, classification):
    x, y = map(torch.from_numpy, classification)
    model = make_mlp()
    trainer = sgd_trainer(model, shuffle=True)
    trainer.fit((x, y), epochs=1)
    predictions = trainer.predict((x, y), batch_size=7)
    with torch.no_grad():
        torch.testing.assert_close(predictions, model(x))


# ---------------------------------------------------------------------------- history
def test_history_records_every_step(make_mlp, classification):
    trainer = sgd_trainer(make_mlp(), batch_size=32)
    history = trainer.fit(classification, epochs=2, val=classification)
    steps = history.steps
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["epoch"] for r in steps] == [1] * 4 + [2] * 4
    assert [r["batch_size"] for r in steps] == [32, 32, 32, 4] * 2
    assert [r["samples"] for r in steps] == [32, 64, 96, 100, 132, 164, 196, 200]
    assert all(r["lr"] == 0.1 for r in steps)
    assert all(isinstance(r["loss"], float) for r in steps)
    seconds = [r["seconds"] for r in steps]
    assert seconds == sorted(seconds)
    assert [e["epoch"] for e in history.epochs] == [1, 2]
    assert history.epochs[0]["loss"] == pytest.approx(np.mean([r["loss"] for r in steps[:4]]))
    assert {"val_loss", "val_accuracy", "steps", "samples"} <= set(history.epochs[1])


def test_history_record_is_one_row_of_steps(make_mlp, classification):
    history = sgd_trainer(make_mlp(), batch_size=32).fit(classification, epochs=1)
    assert [history.record(i) for i in range(len(history))] == history.steps
    assert history.record(-1) == history.steps[-1]


def test_history_to_csv(make_mlp, classification, tmp_path):
    history = sgd_trainer(make_mlp(), batch_size=25).fit(classification, epochs=2, val=classification)
    history.to_csv(tmp_path / "steps.csv", tmp_path / "epochs.csv")
    with open(tmp_path / "steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "epoch", "samples", "batch_size", "loss", "lr", "seconds"]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == pytest.approx(history.losses())
    with open(tmp_path / "epochs.csv") as handle:
        epochs = list(csv.DictReader(handle))
    assert len(epochs) == 2 and float(epochs[1]["val_loss"]) == pytest.approx(history.epochs[1]["val_loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.csv", "steps.csv"]  # no temporary file left


def test_history_plot_writes_a_png(make_mlp, classification, tmp_path):
    history = sgd_trainer(make_mlp(), batch_size=25).fit(classification, epochs=2, val=classification)
    history.plot(tmp_path / "history.png")
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.png"]


# ---------------------------------------------------------------------------- callbacks
class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_fit_begin(self, trainer):
        self.calls.append(("fit_begin",))

    def on_epoch_begin(self, trainer, epoch):
        self.calls.append(("epoch_begin", epoch))

    def on_step_begin(self, trainer, step):
        self.calls.append(("step_begin", step))

    def on_step_end(self, trainer, record):
        self.calls.append(("step_end", dict(record)))

    def on_epoch_end(self, trainer, epoch, record):
        self.calls.append(("epoch_end", epoch, dict(record)))

    def on_fit_end(self, trainer, history):
        self.calls.append(("fit_end", history))


def test_callbacks_are_called_with_records(make_mlp, classification):
    recorder = Recorder()
    history = sgd_trainer(make_mlp(), batch_size=50, callbacks=[recorder]).fit(classification, epochs=2)
    names = [c[0] for c in recorder.calls]
    assert names == ["fit_begin"] + (["epoch_begin"] + ["step_begin", "step_end"] * 2 + ["epoch_end"]) * 2 + [
        "fit_end"]
    assert [c[1] for c in recorder.calls if c[0] == "step_begin"] == [0, 1, 2, 3]
    assert [c[1] for c in recorder.calls if c[0] == "step_end"] == history.steps
    assert [c[2] for c in recorder.calls if c[0] == "epoch_end"] == history.epochs
    assert recorder.calls[-1][1] is history


def test_callback_stop_training_ends_fit_after_the_step(make_mlp, classification):
    class StopAtThree(Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 3:
                trainer.stop_training = True

    history = sgd_trainer(make_mlp(), batch_size=10, callbacks=[StopAtThree()]).fit(classification, epochs=5)
    assert len(history.steps) == 3
    assert history.epochs == []


def test_callbacks_must_be_callback_objects(make_mlp):
    with pytest.raises(ValueError, match=r"`callbacks` must be a sequence of batchfit Callback objects\. "
                                         r"Received: callbacks='function'"):
        sgd_trainer(make_mlp(), callbacks=[lambda trainer: None])


def test_early_stopping_stops_and_restores_the_best_weights(make_mlp, classification):
    x, y = classification
    flipped = (x, (y + 1) % 3)  # the better the model fits the training data, the worse it does here

    class Snapshots(Callback):
        def __init__(self):
            self.weights = []

        def on_epoch_end(self, trainer, epoch, record):
            self.weights.append(copy.deepcopy(trainer.module.state_dict()))

    model, snapshots = make_mlp(), Snapshots()
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    trainer = sgd_trainer(model, lr=0.5, batch_size=20, callbacks=[stopper, snapshots])
    history = trainer.fit((x, y), epochs=20, val=flipped)

    val_losses = [e["val_loss"] for e in history.epochs]
    best = int(np.argmin(val_losses))
    assert len(history.epochs) == best + 1 + 2  # stopped after `patience` epochs without improvement
    assert stopper.best_epoch == best + 1  # epochs count from 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots.weights[best][name]), name


def test_early_stopping_unknown_monitor(make_mlp, classification):
    trainer = sgd_trainer(make_mlp(), callbacks=[EarlyStopping(monitor="val_f1")])
    with pytest.raises(ValueError, match=r"`monitor` must be a key of the epoch record .*Received: monitor='val_f1'"):
        trainer.fit(classification, val=classification)


# ---------------------------------------------------------------------------- progress
def test_progress_false_prints_nothing(make_mlp, classification, capsys):
    sgd_trainer(make_mlp(), batch_size=10, progress=False).fit(classification, epochs=2, val=classification)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_true_shows_a_bar_per_epoch(make_mlp, classification, capsys):
    sgd_trainer(make_mlp(), batch_size=10, progress=True).fit(classification, epochs=2)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err


# ---------------------------------------------------------------------------- learning rate
def lr_history(make_mlp, classification, **options):
    model = make_mlp()
    reference = copy.deepcopy(model)
    history = sgd_trainer(model, batch_size=20, shuffle=False, **options).fit(classification, epochs=2)
    lrs = [r["lr"] for r in history.steps]
    # the recorded lr is the lr each update used: replay it by hand
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for lr, (xb, yb) in zip(lrs, in_order(*classification, 20) * 2):
        optimizer.param_groups[0]["lr"] = lr
        F.cross_entropy(reference(xb), yb).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-7)
    return lrs


@pytest.mark.parametrize(("rule", "factor"), [("linear", 20 / 5), ("sqrt", math.sqrt(20 / 5))])
def test_lr_scaling_scales_the_lr_with_the_batch_size(make_mlp, classification, rule, factor):
    lrs = lr_history(make_mlp, classification, lr_scaling=rule, base_batch_size=5)
    assert lrs == pytest.approx([0.1 * factor] * 10)


def test_warmup_steps_ramp_the_lr_up(make_mlp, classification):
    lrs = lr_history(make_mlp, classification, warmup_steps=4)
    assert lrs == pytest.approx([0.025, 0.05, 0.075] + [0.1] * 7)  # lr * min(1, (step + 1) / warmup_steps)


def test_warmup_after_lr_scaling(make_mlp, classification):
    lrs = lr_history(make_mlp, classification, lr_scaling="linear", base_batch_size=10, warmup_steps=3)
    assert lrs == pytest.approx([0.2 / 3, 0.4 / 3] + [0.2] * 8)


def test_lr_schedule_multiplies_the_lr(make_mlp, classification):
    lrs = lr_history(make_mlp, classification, lr_schedule=lambda step: 0.5 ** (step // 5))
    assert lrs == pytest.approx([0.1] * 5 + [0.05] * 5)


# ---------------------------------------------------------------------------- precision and clipping
def test_bf16_precision_trains_on_cpu(make_mlp, classification):
    model = make_mlp()
    trainer = sgd_trainer(model, lr=0.5, batch_size=20, precision="bf16", device="cpu")
    history = trainer.fit(classification, epochs=5)
    losses = history.losses()
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32
    assert set(trainer.evaluate(classification)) == {"loss", "accuracy"}


def test_max_grad_norm_clips_like_clip_grad_norm(make_mlp, classification, assert_close):
    model = make_mlp()
    reference = copy.deepcopy(model)
    sgd_trainer(model, lr=0.5, batch_size=20, shuffle=False, max_grad_norm=0.05).fit(classification, epochs=2)
    norms = []
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for xb, yb in in_order(*classification, 20) * 2:
        F.cross_entropy(reference(xb), yb).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05).item())
        optimizer.step()
        optimizer.zero_grad()
    assert min(norms) > 0.05  # every step was clipped
    assert_close(model.state_dict(), reference.state_dict())


# ---------------------------------------------------------------------------- data and models fit accepts
class PairDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class BatchedPairDataset(PairDataset):
    def __getitems__(self, index_list):
        return torch.from_numpy(self.x[index_list]), torch.from_numpy(self.y[index_list])


@pytest.mark.parametrize("dataset_type", [PairDataset, BatchedPairDataset])
@pytest.mark.parametrize("wrap", [False, True], ids=["dataset", "DatasetSource"])
def test_fit_on_a_map_style_dataset_equals_fit_on_arrays(make_mlp, classification, dataset_type, wrap,
                                                         assert_close):
    dataset = dataset_type(*classification)
    weights = []
    for data in (DatasetSource(dataset) if wrap else dataset, ArraySource(*classification)):
        model = make_mlp()
        sgd_trainer(model, batch_size=16, seed=3).fit(data, epochs=2)
        weights.append(model.state_dict())
    assert_close(*weights)


def test_fit_accepts_a_tuple_of_arrays(make_mlp, classification, assert_close):
    x, y = classification
    model, reference = make_mlp(), make_mlp()
    sgd_trainer(model, batch_size=16, shuffle=False).fit((x, y), epochs=1)
    hand_sgd(reference, in_order(x, y, 16))
    assert_close(model.state_dict(), reference.state_dict())


def test_fit_casts_float64_inputs_to_the_model_dtype(make_mlp, regression, assert_close):
    x, y = regression
    model, reference = make_mlp(out_features=1), make_mlp(out_features=1)
    sgd_trainer(model, F.mse_loss, batch_size=8, shuffle=False).fit((x.astype(np.float64), y.astype(np.float64)))
    hand_sgd(reference, in_order(x, y, 8), F.mse_loss)
    assert_close(model.state_dict(), reference.state_dict())
    assert model[0].weight.dtype == torch.float32


def test_fit_float32_inputs_into_a_float64_model(make_mlp, regression, assert_close):
    x, y = regression
    model, reference = make_mlp(out_features=1).double(), make_mlp(out_features=1).double()
    sgd_trainer(model, F.mse_loss, batch_size=8, shuffle=False).fit((x, y))
    hand_sgd(reference, in_order(x.astype(np.float64), y.astype(np.float64), 8), F.mse_loss)
    assert_close(model.state_dict(), reference.state_dict())


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(5, 3), torch.nn.Linear(2, 3)

    def forward(self, first, second):
        return self.a(first) + self.b(second)


def test_fit_several_inputs_then_the_target(classification, assert_close):
    x, y = classification
    extra = np.random.default_rng(0).standard_normal((100, 2)).astype(np.float32)
    model, reference = TwoInputs(), TwoInputs()
    sgd_trainer(model, batch_size=30, shuffle=False).fit((x, extra, y))
    hand_sgd(reference, [(a, b, t) for (a, t), (b, _) in zip(in_order(x, y, 30), in_order(extra, y, 30))])
    assert_close(model.state_dict(), reference.state_dict())


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class LossReturningModel(torch.nn.Module):
    """Computes its own loss from ``labels``, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, features, labels=None):
        logits = self.linear(features)
        return Output(None if labels is None else F.cross_entropy(logits, labels), logits)


def test_fit_dict_batches_with_a_model_that_returns_its_loss(classification, assert_close):
    x, y = classification
    model, reference = LossReturningModel(), LossReturningModel()
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=32, micro_batch_size=10,
                      shuffle=False, progress=False)
    history = trainer.fit({"features": x, "labels": y}, epochs=2)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    losses = []
    for _ in range(2):
        for xb, yb in in_order(x, y, 32):
            loss = reference(xb, labels=yb).loss
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_close(model.state_dict(), reference.state_dict())
    np.testing.assert_allclose(history.losses(), losses, rtol=1e-6)
    with torch.no_grad():
        expected_loss = reference(torch.from_numpy(x), labels=torch.from_numpy(y)).loss.item()
    assert trainer.evaluate({"features": x, "labels": y})["loss"] == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(trainer.predict({"features": x, "labels": y}),
                               reference(torch.from_numpy(x)).logits.detach())


def test_fit_with_prefetch_equals_fit_without(make_mlp, classification, assert_close):
    weights = []
    for prefetch in (0, 3):
        model = make_mlp()
        sgd_trainer(model, batch_size=16, prefetch=prefetch).fit(classification, epochs=2)
        weights.append(model.state_dict())
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name])


def test_early_stopping_used_again_starts_afresh(make_mlp, classification):
    x, y = classification
    stopper = EarlyStopping(monitor="val_loss", patience=1)
    first = sgd_trainer(make_mlp(), lr=0.5, batch_size=20, callbacks=[stopper])
    first.fit((x, y), epochs=20, val=(x, (y + 1) % 3))
    assert stopper.stopped
    second = sgd_trainer(make_mlp(), lr=0.5, batch_size=20, callbacks=[stopper])
    history = second.fit((x, y), epochs=20, val=(x, (y + 1) % 3))
    assert len(history.epochs) == len(first.history.epochs)


def test_history_reads_pending_losses_back_in_bounded_chunks():
    from batchfit.train.history import READBACK_EVERY

    history = History()
    for step in range(1, 3 * READBACK_EVERY + 2):
        history.add_step(step, 0, step, 1, torch.tensor(float(step)), 0.1, 0.0)
        assert len(history) - history._pending_from < READBACK_EVERY  # tensors are only ever at the end
    assert not any(isinstance(v, torch.Tensor) for v in history._columns["loss"][: 3 * READBACK_EVERY])
    assert history.losses() == [float(s) for s in range(1, 3 * READBACK_EVERY + 2)]


def test_fit_second_call_continues_with_next_epochs(make_mlp, classification):
    import batchfit as bf
    from batchfit.data.order import epoch_order

    x, y = classification
    model = make_mlp()
    trainer = bf.Trainer(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         batch_size=25, progress=False, seed=3)
    trainer.fit((x, y), epochs=2)
    seen = []

    class Spy(bf.Callback):
        def on_epoch_begin(self, trainer, epoch):
            seen.append((epoch, trainer.batcher.order().copy()))

    trainer.callbacks.append(Spy())
    history = trainer.fit((x, y), epochs=1)
    assert [record["epoch"] for record in history.epochs] == [1, 2, 3]
    assert trainer.step == 12
    assert seen[0][0] == 3 and np.array_equal(seen[0][1], epoch_order(len(y), True, 3, 2))  # 3rd epoch: order 2


def test_on_nan_raise_on_cpu_never_applies_the_bad_update(make_mlp, classification):
    import batchfit as bf

    x, y = classification
    x = x.copy()
    x[40:50] = np.nan  # the third batch of 20 (no shuffle) has a NaN loss
    model = make_mlp()
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=20,
                         shuffle=False, progress=False)
    with pytest.raises(bf.NonFiniteLossError, match="step 3 \\(epoch 1\\)"):
        trainer.fit((x, y), epochs=1)
    assert trainer.step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
