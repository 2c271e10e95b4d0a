"""batch_size="auto" and "adaptive": the choice, its evidence, growth, lr rules, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.measure.auto import (
    AdaptiveBatch,
    auto_lr_factor,
    batch_cost,
    choose_batch_size,
    powers_of_two,
    round_to_power_of_two,
    rule_lr_ratio,
)


def _noisy_classification(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = ((x[:, 0] + 0.8 * rng.standard_normal(n)) > 0).astype(np.int64)
    return x, y


def test_powers_of_two_range():
    assert powers_of_two(8, 100) == [8, 16, 32, 64]
    assert powers_of_two(5, 5) == [5]  # no power of two inside: the bound itself
    assert round_to_power_of_two(300, 8, 1024) == 256
    assert round_to_power_of_two(math.inf, 8, 1024) == 1024
    assert round_to_power_of_two(2, 8, 1024) == 8


def test_batch_cost_trades_noise_against_throughput():
    # Same throughput: the smaller batch needs fewer samples, so it is cheaper.
    assert batch_cost(32, 100.0, 1000.0) < batch_cost(256, 100.0, 1000.0)
    # Throughput that grows 8x wins for a large noise scale.
    assert batch_cost(256, 1e6, 8000.0) < batch_cost(32, 1e6, 1000.0)


def test_batch_cost_is_infinite_where_the_lr_diverges():
    at_optimum = batch_cost(64, 100.0, 1000.0)
    assert batch_cost(64, 100.0, 1000.0, lr_ratio=1.9) == at_optimum
    assert batch_cost(64, 100.0, 1000.0, lr_ratio=2.0) == math.inf  # the loss no longer falls


def test_rule_lr_ratio_is_one_at_base_and_overshoots_past_the_noise_scale():
    assert rule_lr_ratio(32, 32, 100.0, "linear") == pytest.approx(1.0)
    # Far below the noise scale the optimal lr grows linearly with the batch: the linear rule stays near 1.
    assert rule_lr_ratio(8, 4, 1e6, "linear") == pytest.approx(1.0, rel=1e-4)
    # Far above it the optimal lr is flat: the linear rule overshoots by about the batch ratio.
    assert rule_lr_ratio(4096, 32, 10.0, "linear") > 2
    assert 1 < rule_lr_ratio(4096, 32, 10.0, "sqrt") < rule_lr_ratio(4096, 32, 10.0, "linear")
    # A fixed lr is too small for batches above the base, too large below it.
    assert rule_lr_ratio(128, 32, 100.0, None) < 1 < rule_lr_ratio(8, 32, 100.0, None)
    assert rule_lr_ratio(128, None, 100.0, "linear") == 1.0  # unknown base: taken as optimal
    assert rule_lr_ratio(128, 32, 100.0, "adascale") == 1.0


def test_auto_never_picks_a_batch_whose_rule_lr_diverges(make_mlp):
    x, y = _noisy_classification(4096)
    model = make_mlp(6, 16, 2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size="auto",
                         lr_scaling="linear", base_batch_size=8, progress=False)
    trainer._prepare(bf.ArraySource(x, y))
    chosen = trainer.batcher.batch_size
    assert "lr / optimal lr" in trainer.history.events[0]["reason"]  # the noise scale's prediction, as evidence
    # A plain loop at the chosen batch with the lr the rule gives it: the loss falls and stays finite.
    reference = make_mlp(6, 16, 2)
    reference.load_state_dict(initial)
    # The lr the trainer uses: the rule's, or less where its own factor failed the short trial.
    lr = 0.1 * min(bf.scale_lr(1.0, 8, chosen, "linear"), trainer.lr.rule_cap)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        index = torch.randint(len(x), (chosen,), generator=generator)
        loss = F.cross_entropy(reference(torch.from_numpy(x)[index]), torch.from_numpy(y)[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and sum(losses[-10:]) < sum(losses[:10])


def test_auto_batch_size_is_a_measured_power_of_two_and_probe_leaves_weights(make_mlp):
    x, y = _noisy_classification()
    model = make_mlp(6, 16, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = bf.Trainer(model, F.cross_entropy, optimizer, batch_size="auto", progress=False)
    trainer._prepare(bf.ArraySource(x, y))
    chosen = trainer.batcher.batch_size
    assert chosen in powers_of_two(8, 256)  # at most half the data: two steps an epoch
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert optimizer.state == {}  # the probe never stepped the user's optimizer
    event = trainer.history.events[0]
    assert event["kind"] == "batch_size" and event["batch_size"] == chosen
    assert "noise scale" in event["reason"] and "throughput" in event["reason"]


def test_adaptive_batch_grows_with_noise_scale_and_is_capped():
    class Loop:  # what the training loop does with the policy's proposals
        history = bf.History()
        batch_size = 16

        def apply(self, step, change):
            if change is not None:
                self.history.add_event(step=step, kind="batch_size", batch_size=change.batch_size,
                                       reason=change.reason)
                policy.accept(change)
                self.batch_size = change.batch_size

    trainer = Loop()
    policy = AdaptiveBatch(start=16, max_batch=128, every=5, warmup=5, beta=0.5)
    # Pairs with |G|² = 1 and tr Σ = 400 give B_simple = 400: the target is capped at 128.
    b_small, b_big = 8, 64
    small_sq = 1 + 400 / b_small
    big_sq = 1 + 400 / b_big
    sizes = []
    for step in range(1, 21):
        trainer.apply(step, policy.propose(step, (small_sq, big_sq, b_small, b_big)))
        sizes.append(trainer.batch_size)
    assert sizes == sorted(sizes)  # never shrinks
    assert sizes[3] == 16 and sizes[-1] == 128  # waits for its warm-up, then grows to the cap
    assert trainer.history.events and trainer.history.events[0]["batch_size"] == 128
    assert math.isclose(policy.tracker.b_simple, 400, rel_tol=1e-6)


def test_adaptive_fit_records_noise_scale_and_events(make_mlp):
    x, y = _noisy_classification(1024)
    model = make_mlp(6, 16, 2)
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.05),
                         batch_size="adaptive", progress=False)
    history = trainer.fit((x, y), epochs=3)
    steps = history.steps
    assert all("noise_scale" in record for record in steps)
    assert any(math.isfinite(record["noise_scale"]) for record in steps)
    changes = [e for e in history.events if e["kind"] == "batch_size"]
    assert changes, "the first decision is always logged"
    sizes = [r["batch_size"] for r in steps if r["step"] < steps[-1]["step"]]
    epochs = [r["epoch"] for r in steps]
    # Within an epoch the batch never shrinks except for the epoch's last, partial batch.
    for (size, epoch), (next_size, next_epoch) in zip(zip(sizes, epochs), zip(sizes[1:], epochs[1:])):
        if epoch == next_epoch and next_size < size:
            pytest.fail(f"batch shrank from {size} to {next_size} inside epoch {epoch}")
    assert sum(r["batch_size"] for r in steps if r["epoch"] == 1) == len(x)  # every sample once


def test_adascale_lr_gain_within_one_and_scale(make_mlp):
    x, y = _noisy_classification(512)
    model = make_mlp(6, 16, 2)
    base_lr, base_batch, batch = 0.01, 16, 128
    trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=base_lr), batch_size=batch,
                         lr_scaling="adascale", base_batch_size=base_batch, progress=False)
    history = trainer.fit((x, y), epochs=2)
    gains = [r["lr"] / base_lr for r in history.steps]
    assert all(1 - 1e-9 <= g <= batch / base_batch + 1e-9 for g in gains)
    assert len(set(gains)) > 1, "the gain follows the measured noise"


def test_auto_resume_keeps_measured_batch_size(make_mlp, tmp_path):
    x, y = _noisy_classification(256)

    def run(epochs: int, resume: bool) -> bf.Trainer:
        model = make_mlp(6, 16, 2)
        trainer = bf.Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.05),
                             batch_size="auto", progress=False, checkpoint_dir=tmp_path)
        trainer.fit((x, y), epochs=epochs, resume=resume)
        return trainer

    first = run(1, resume=False)
    second = run(2, resume=True)
    assert second.batcher.batch_size == first.batcher.batch_size
    assert [e["kind"] for e in second.history.events] == ["batch_size"]  # no second probe


def test_auto_lr_factor_stops_the_sqrt_rule_at_the_noise_scale():
    assert auto_lr_factor(128, 32, 1000.0, "sqrt") == pytest.approx(2.0)  # below the noise scale: the rule
    assert auto_lr_factor(1024, 32, 128.0, "sqrt") == pytest.approx(2.0)  # above it: the rule's lr at 128
    assert auto_lr_factor(1024, 32, 8.0, "sqrt") == pytest.approx(1.0)  # a noise scale below the base: yours
    assert auto_lr_factor(1024, 32, 128.0, "linear") == pytest.approx(32.0)  # linear: whole (the trial bounds it)
    assert auto_lr_factor(1024, 32, math.nan, "sqrt") == pytest.approx(math.sqrt(32))
    assert auto_lr_factor(1024, None, 128.0, "sqrt") == auto_lr_factor(1024, 32, 128.0, None) == 1.0


def _linear_regression(n: int = 8192, features: int = 8, noise: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = (x @ (0.2 * rng.standard_normal(features)) + noise * rng.standard_normal(n)).astype(np.float32)[:, None]
    return x, y


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 1)


def test_auto_halves_the_rule_lr_where_it_diverges_and_keeps_the_batch():
    # MSE on unit-variance features: the Hessian is 2·I, so SGD diverges from lr 1 on. The user's
    # lr 0.25 at batch 8 is stable; the linear rule gives 0.25 × B / 8, past 1 from batch 32 on.
    x, y = _linear_regression()
    model = _linear()
    trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.25), batch_size="auto",
                         lr_scaling="linear", base_batch_size=8, progress=False)
    trainer.fit((x, y), epochs=1)
    chosen = trainer.batcher.batch_size
    lr = trainer.history.column("lr")[0]
    assert chosen >= 32  # past where the rule's lr diverges: the batch was kept, the lr capped
    assert lr < 1.0 <= 0.25 * chosen / 8
    assert lr >= 0.25  # never below the user's own
    assert trainer.lr.rule_cap == lr / 0.25
    event = trainer.history.events[0]
    assert event["lr_cap"] == trainer.lr.rule_cap
    assert "the lr rises by at most" in event["reason"]
    # It trains: the loss ends near the noise floor (1.0).
    assert trainer.evaluate((x, y))["loss"] < 1.15


def test_auto_never_goes_below_the_base_batch():
    # Noisy targets far from the starting weights: the noise scale there is a few samples, and the
    # cost alone would pick the smallest batch; the user's lr was meant for 64. (Measured at the
    # starting weights: the warm-up would take the noise scale past 64 here.)
    x, y = _linear_regression()
    model = _linear()
    choice = choose_batch_size(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), bf.ArraySource(x, y),
                               device=torch.device("cpu"), lr_scaling="linear", base_batch_size=64, warmup_steps=0)
    assert choice.b_simple < 32
    assert choice.batch_size >= 64 and "not below base_batch_size=64" in choice.reason


def test_auto_measures_after_a_warm_up_and_puts_the_weights_back():
    # Linear regression from far away: the gradient shrinks as the fit nears the noise floor while
    # the per-sample noise stays, so the noise scale grows by an order of magnitude in a few steps.
    x, y = _linear_regression()
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cold = choose_batch_size(model, F.mse_loss, optimizer, bf.ArraySource(x, y), device=torch.device("cpu"),
                             lr_scaling="linear", base_batch_size=64, warmup_steps=0)
    warm = choose_batch_size(model, F.mse_loss, optimizer, bf.ArraySource(x, y), device=torch.device("cpu"),
                             lr_scaling="linear", base_batch_size=64)
    assert warm.b_simple > 5 * cold.b_simple
    assert warm.reason.startswith("measured after 25 steps at batch 64 with your lr")
    assert cold.reason.startswith("measured at the starting weights")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert optimizer.state == {} and optimizer.param_groups[0]["lr"] == 0.05


def test_auto_measures_at_the_start_when_your_lr_diverges():
    x, y = _linear_regression(1024)
    model = _linear()
    choice = choose_batch_size(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=50.0), bf.ArraySource(x, y),
                               device=torch.device("cpu"), lr_scaling="linear", base_batch_size=16)
    assert "your lr diverged in 25 warm-up steps at batch 16" in choice.reason
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_auto_resume_keeps_the_capped_lr(tmp_path):
    # An uninterrupted run of two epochs, then a run resumed from its first epoch's checkpoint: the
    # same measured batch, the same capped lr on every step, bit-identical weights.
    import shutil

    x, y = _linear_regression(2048)

    def run(folder, resume: bool) -> bf.Trainer:
        model = _linear()
        trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.25), batch_size="auto",
                             lr_scaling="linear", base_batch_size=8, progress=False, checkpoint_dir=folder,
                             keep_checkpoints=3)
        trainer.fit((x, y), epochs=2, resume=resume)
        return trainer

    whole = run(tmp_path / "whole", resume=False)
    assert whole.lr.rule_cap < whole.batcher.batch_size / 8  # the rule's own factor was capped
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    newest = sorted((tmp_path / "split").glob("step-*.pt"))
    assert len(newest) >= 2
    newest[-1].unlink()  # as if killed during the second epoch
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.batcher.batch_size == whole.batcher.batch_size and resumed.lr.rule_cap == whole.lr.rule_cap
    assert resumed.history.column("lr") == whole.history.column("lr")
    for name, value in whole.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name
