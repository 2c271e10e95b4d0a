"""torch's lr schedulers plug in: stepped per update or per epoch, the lr actually used recorded,
their state in checkpoints (a resumed run ends where an uninterrupted one does)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchfit as bf


def run(schedule, folder=None, callbacks=(), **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options.setdefault("batch_size", 16)
    trainer = bf.Trainer(model, F.cross_entropy, optimizer, lr_schedule=schedule(optimizer), progress=False,
                         checkpoint_dir=folder, callbacks=list(callbacks), **options)
    return trainer


def test_step_lr_per_update_matches_a_plain_loop(classification):
    trainer = run(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    trainer.fit(classification, epochs=2)  # 7 steps an epoch
    expected = [0.1 * 0.5 ** (step // 3) for step in range(14)]
    assert trainer.history.column("lr") == pytest.approx(expected, rel=1e-12)


def test_scheduler_per_epoch(classification):
    trainer = run(lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5), lr_schedule_interval="epoch")
    trainer.fit(classification, epochs=3)
    lrs = trainer.history.column("lr")
    assert lrs == pytest.approx([0.1] * 7 + [0.05] * 7 + [0.025] * 7, rel=1e-12)


def test_reduce_on_plateau_follows_the_validation_loss(classification):
    x, y = classification
    trainer = run(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0))
    trainer.fit((x, y), epochs=4, val=(x, (y + 1) % 3))  # validation worsens: the lr drops
    assert min(trainer.history.column("lr")) < 0.1


def test_lr_changed_by_a_callback_is_what_history_records(classification):
    class Halve(bf.Callback):
        def on_step_begin(self, trainer, step):
            if step == 5:
                for group in trainer.optimizer.param_groups:
                    group["lr"] = 0.05

    model = torch.nn.Linear(5, 3)
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16,
                         progress=False, callbacks=[Halve()])
    trainer.fit(classification, epochs=1)
    assert trainer.history.column("lr") == [0.1] * 5 + [0.05] * 2


def test_scheduler_with_linear_scaling_scales_once(classification):
    trainer = run(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5),
                  lr_scaling="linear", base_batch_size=8)
    trainer.fit(classification, epochs=1)
    trainer.fit(classification, epochs=1)  # a second fit does not scale again
    assert trainer.history.column("lr") == pytest.approx([0.2] * 14, rel=1e-12)


class CrashAt(bf.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt


def test_scheduler_state_resumes_exactly(tmp_path, classification):
    def schedule(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=21)

    whole = run(schedule, tmp_path / "a", checkpoint_every=2)
    whole.fit(classification, epochs=3)
    crashing = run(schedule, tmp_path / "b", checkpoint_every=2, callbacks=[CrashAt(9)])
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(classification, epochs=3)
    resumed = run(schedule, tmp_path / "b", checkpoint_every=2)
    resumed.fit(classification, epochs=3, resume=True)
    assert resumed.history.column("lr") == whole.history.column("lr")
    for name, value in whole.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name


def test_scheduler_of_another_optimizer_or_with_warmup_is_refused():
    model = torch.nn.Linear(5, 3)
    other = torch.optim.SGD(torch.nn.Linear(5, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="a torch lr scheduler of the Trainer's optimizer"):
        bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                   lr_schedule=torch.optim.lr_scheduler.StepLR(other, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be 0 with a torch lr scheduler"):
        bf.Trainer(model, F.cross_entropy, optimizer, warmup_steps=5,
                   lr_schedule=torch.optim.lr_scheduler.StepLR(optimizer, 2))
