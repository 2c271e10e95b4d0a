"""The plain step (one process, fp32, no micro-batches) calls the optimizer's own step and clears the gradients
itself, without PyTorch's per-call profiler ranges: the same update as optimizer.step(); zero_grad(), and the
wrapped calls whenever a profiler, a step hook or an lr scheduler watches them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from batchfit.core.step import Step


def setup(optimizer_cls=torch.optim.SGD, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = optimizer_cls(model.parameters(), lr=0.1, **options)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    return model, optimizer, (x, y)


def hand_steps(steps: int, optimizer_cls=torch.optim.SGD, **options):
    model, optimizer, (x, y) = setup(optimizer_cls, **options)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("optimizer_cls, options", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.AdamW, {})])
def test_the_plain_step_is_the_hand_written_step(optimizer_cls, options):
    model, optimizer, batch = setup(optimizer_cls, **options)
    step = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"))
    assert step.plain and step.bare_step is not None
    for _ in range(4):
        assert step.step(batch, 16).applied
        assert all(p.grad is None for p in model.parameters())
    for mine, theirs in zip(model.parameters(), hand_steps(4, optimizer_cls, **options).parameters()):
        assert torch.equal(mine, theirs)


def test_a_profiler_still_sees_the_optimizer_step():
    model, optimizer, batch = setup()
    step = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"))
    with torch.profiler.profile() as profile:
        step.step(batch, 16)
    names = {event.name for event in profile.events()}
    assert "Optimizer.step#SGD.step" in names and "Optimizer.zero_grad#SGD.zero_grad" in names


def test_step_hooks_still_run():
    model, optimizer, batch = setup()
    step = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"))
    calls = []
    handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("mine"))
    step.step(batch, 16)
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("all"))
    try:
        step.step(batch, 16)
    finally:
        handle.remove()
    step.step(batch, 16)
    assert calls == ["mine", "all"]


def test_an_lr_scheduler_sees_the_optimizer_step():
    """A scheduler patches optimizer.step on the instance to learn it was called: no warning that it stepped first."""
    model, optimizer, batch = setup()
    step = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            step.step(batch, 16)
            scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_an_optimizer_with_its_own_zero_grad_is_called_as_it_is():
    class Counting(torch.optim.SGD):
        zeroed = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            Counting.zeroed += 1
            super().zero_grad(set_to_none)

    model, optimizer, batch = setup(Counting)
    step = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"))
    assert step.bare_step is None
    step.step(batch, 16)
    assert Counting.zeroed == 1


def test_unobserved_steps_skip_the_wrapper():
    """Without a profiler, hook or scheduler the optimizer class's own step runs, not PyTorch's wrapper around it
    (whose hook point ``_optimizer_step_code`` would be called)."""
    model, optimizer, batch = setup()
    calls = []
    optimizer._optimizer_step_code = lambda: calls.append(1)  # only the wrapper calls it
    step = Step(model, F.cross_entropy, optimizer, device=torch.device("cpu"))
    step.step(batch, 16)
    assert calls == []
    optimizer.step()  # the wrapped call, for comparison
    assert calls == [1]
