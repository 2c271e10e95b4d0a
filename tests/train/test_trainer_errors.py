"""Bad input is refused early and clearly: a ValueError naming the argument, the expected and the received."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchfit import BatchfitError, NonFiniteLossError, Trainer
from batchfit.train import checkpoint as ckpt


def make_trainer(model=None, **options):
    model = model if model is not None else torch.nn.Linear(5, 3)
    options.setdefault("progress", False)
    return Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), **options)


@pytest.mark.parametrize(("value", "shown"), [(0, "0"), (-4, "-4"), (2.5, "2.5"), (True, "True"), ("big", "'big'")])
def test_trainer_bad_batch_size(value, shown):
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, 'full', 'auto' or 'adaptive'\. "
                                         rf"Received: batch_size={shown}$"):
        make_trainer(batch_size=value)


def test_trainer_batch_size_larger_than_data_with_drop_last(classification):
    trainer = make_trainer(batch_size=101, drop_last=True)
    with pytest.raises(ValueError, match=r"`batch_size` must be at most the number of samples \(100\) when "
                                         r"drop_last=True\. Received: batch_size=101"):
        trainer.fit(classification)


@pytest.mark.parametrize(("value", "match"), [
    (65, r"`micro_batch_size` must be at most batch_size=64\. Received: micro_batch_size=65"),
    (0, r"`micro_batch_size` must be a positive integer\. Received: micro_batch_size=0"),
    (2.5, r"`micro_batch_size` must be a positive integer\. Received: micro_batch_size=2.5"),
])
def test_trainer_bad_micro_batch_size(value, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(batch_size=64, micro_batch_size=value)


def test_trainer_mismatched_array_lengths(classification):
    x, y = classification
    with pytest.raises(ValueError, match=r"same number of samples.*Received lengths: .*100.*99"):
        make_trainer().fit((x, y[:-1]))


def test_trainer_empty_data():
    with pytest.raises(ValueError, match=r"`train` must be at least one sample\. "
                                         r"Received: train='an empty source \(0 samples\)'"):
        make_trainer().fit((np.zeros((0, 5), np.float32), np.zeros(0, np.int64)))


def test_trainer_data_of_unknown_type():
    with pytest.raises(ValueError, match=r"`train` must be a source, a tuple of arrays.*Received: train='int'"):
        make_trainer().fit(7)


def test_trainer_negative_epochs(classification):
    with pytest.raises(ValueError, match=r"`epochs` must be a non-negative integer\. Received: epochs=-1"):
        make_trainer().fit(classification, epochs=-1)


@pytest.mark.parametrize(("option", "value", "match"), [
    ("precision", "fp8", r"`precision` must be one of 'fp32', 'bf16', 'fp16'\. Received: precision='fp8'"),
    ("on_nan", "ignore", r"`on_nan` must be one of 'raise', 'skip', 'rollback'\. Received: on_nan='ignore'"),
    ("lr_scaling", "cubic", r"`lr_scaling` must be one of None, 'linear', 'sqrt'.*\. Received: lr_scaling='cubic'"),
    ("shuffle", "random",
     r"`shuffle` must be one of False, True, 'full', 'block', 'length'\. Received: shuffle='random'"),
    ("device", "tpu", r"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N'\. Received: device='tpu'"),
    ("device", "meta", r"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N'\. Received: device='meta'"),
    ("max_grad_norm", -1.0, r"`max_grad_norm` must be a positive number or None\. Received: max_grad_norm=-1.0"),
    ("seed", 1.5, r"`seed` must be a non-negative integer\. Received: seed=1.5"),
    ("seed", -1, r"`seed` must be a non-negative integer\. Received: seed=-1"),
    ("warmup_steps", -2, r"`warmup_steps` must be a non-negative integer\. Received: warmup_steps=-2"),
])
def test_trainer_unknown_option_value(option, value, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(**{option: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_trainer_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"`device` must be a device this machine has\. Received: device='cuda'"):
        make_trainer(device="cuda")


def test_trainer_lr_scaling_without_base_batch_size():
    with pytest.raises(ValueError, match=r"`base_batch_size` must be the batch size the optimizer's lr was tuned "
                                         r"for \(required with lr_scaling\)\. Received: base_batch_size=None"):
        make_trainer(lr_scaling="linear")


@pytest.mark.parametrize("options", [{"checkpoint_every": 5}, {"on_nan": "rollback"}])
def test_trainer_checkpoint_options_without_checkpoint_dir(options):
    with pytest.raises(ValueError, match=r"`checkpoint_dir` must be a folder when .*\. Received: checkpoint_dir=None"):
        make_trainer(**options)


def test_trainer_resume_without_checkpoint_dir(classification):
    with pytest.raises(ValueError, match=r"`checkpoint_dir` must be a folder when resume=True"):
        make_trainer().fit(classification, resume=True)


def test_trainer_not_a_model_or_optimizer():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"`model` must be a torch\.nn\.Module\. Received: model='function'"):
        Trainer(lambda x: x, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"`optimizer` must be a torch\.optim\.Optimizer\. Received: optimizer='list'"):
        Trainer(model, F.mse_loss, [])


def test_trainer_tuple_batch_without_target():
    with pytest.raises(ValueError, match=r"needs a target as its last element"):
        make_trainer().fit((np.zeros((4, 5), np.float32),))


def nan_data(classification, bad_sample: int = 35):
    """The classification data with one NaN feature in sample ``bad_sample`` (batch 3 of batches of 10)."""
    x, y = classification
    x = x.copy()
    x[bad_sample, 2] = np.nan
    return x, y


def test_trainer_nan_loss_raise_names_step_and_epoch(classification, tmp_path):
    trainer = make_trainer(batch_size=10, shuffle=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"the loss of step 4 \(epoch 1\) is nan") as raised:
        trainer.fit(nan_data(classification), epochs=2)
    assert (raised.value.step, raised.value.epoch) == (4, 1)
    # a failure while training, not a refused input: `except ValueError` around a fit does not swallow it
    assert isinstance(raised.value, BatchfitError) and isinstance(raised.value, RuntimeError)
    assert not isinstance(raised.value, ValueError)
    # nothing written half-way: no checkpoint holds the NaN step or anything after it
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [f"step-00000000{i}.pt" for i in (3, 2, 1)]


def test_trainer_nan_loss_skip_leaves_the_weights_untouched(classification):
    x, y = classification
    model = torch.nn.Linear(5, 3)
    before = copy.deepcopy(model.state_dict())
    trainer = make_trainer(model, batch_size=30, on_nan="skip")
    history = trainer.fit((np.full_like(x, np.nan), y), epochs=2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert trainer.skipped_steps == 8 and trainer.step == 0
    assert history.epochs[-1]["skipped_steps"] == 8
    assert len(history.steps) == 0


def test_trainer_nan_loss_skip_drops_only_the_bad_batch(classification, assert_close):
    x, y = nan_data(classification)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    reference = copy.deepcopy(model)
    trainer = make_trainer(model, batch_size=10, shuffle=False, on_nan="skip")
    history = trainer.fit((x, y), epochs=1)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for start in range(0, 100, 10):
        if start == 30:
            continue  # the batch holding sample 35
        F.cross_entropy(reference(xt[start : start + 10]), yt[start : start + 10]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_close(model.state_dict(), reference.state_dict())
    assert trainer.skipped_steps == 1
    assert [r["step"] for r in history.steps] == list(range(1, 10))
    assert history.steps[-1]["samples"] == 90
