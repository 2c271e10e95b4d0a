"""The plain PyTorch loop the ground truth is measured with, and the per-batch-size step time.

Nothing of batchfit's is used here: a shuffled order from ``torch.randperm`` per epoch, batches
by ``index_select``, forward, loss, backward, step, zero, and the validation loss checked at
steps spaced 3 % apart (every step for the first 34), so a step count is at most 3 % late.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from benchmarks.groundtruth_tasks import Task


def validation_loss(task: Task, model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(task.loss_fn(model(task.val[0]), task.val[1]))


def next_check(step: int) -> int:
    """The step after ``step`` at which the target is checked: every step up to 34, then 3 % apart."""
    return max(step + 1, math.ceil(step * 1.03))


def initial_state(task: Task, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in task.make_model().state_dict().items()}


def plain_run(task: Task, init: dict[str, torch.Tensor], batch_size: int, lr: float, seed: int = 0,
              max_steps: int | None = None) -> dict[str, Any]:
    """Train from ``init`` until the validation loss reaches the target; steps to it, or ``None``.

    ``max_steps`` (by default the task's budget in samples over the batch size) ends a run that
    has not reached the target; a non-finite loss, or a validation loss no lower than at the start
    after 100 steps, ends it as diverged; a validation loss that has not improved in as many
    steps as its best took (after 100) ends it as not reached (overfitting, as Adam on ratings).
    """
    model = task.make_model()
    model.load_state_dict(init)
    optimizer = task.make_optimizer(model, lr)
    x, y = task.train
    n = len(y)
    limit = max_steps if max_steps is not None else max(1, task.budget_samples // batch_size)
    generator = torch.Generator().manual_seed(seed)
    step, check, order, position = 0, 1, torch.empty(0, dtype=torch.long), n
    start_loss = validation_loss(task, model)
    best_loss, best_step = start_loss, 0
    while step < limit:
        if position + batch_size > n:  # a new epoch once the remainder cannot fill a batch
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position: position + batch_size]
        position += batch_size
        loss = task.loss_fn(model(x.index_select(0, index)), y.index_select(0, index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if not math.isfinite(loss.item()):
            return {"steps": None, "steps_run": step, "diverged": True}
        if step == check:
            check = next_check(step)
            loss_now = validation_loss(task, model)
            if loss_now <= task.target:
                return {"steps": step, "steps_run": step, "diverged": False}
            if step >= 100 and loss_now >= start_loss:  # no better than the start after 100 steps: stalled
                return {"steps": None, "steps_run": step, "diverged": True}
            if loss_now < best_loss:
                best_loss, best_step = loss_now, step
            elif step >= max(100, 2 * best_step):  # no progress in as many steps as its best took: overfitting
                return {"steps": None, "steps_run": step, "diverged": False}
    return {"steps": None, "steps_run": step, "diverged": False}


def step_seconds(task: Task, sizes: list[int], rounds: int = 7, window: float = 0.05) -> dict[int, float]:
    """Median seconds of one training step at each batch size, the sizes interleaved round by round.

    Each round times a block of steps at each size (at least ``window`` seconds); interleaving
    spreads any load on the machine over every size alike, so ratios between sizes hold.
    """
    model = task.make_model()
    optimizer = task.make_optimizer(model, 1e-4)
    x, y = task.train
    generator = torch.Generator().manual_seed(1)
    per_round: dict[int, list[float]] = {size: [] for size in sizes}

    def block(size: int, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            index = torch.randint(len(y), (size,), generator=generator)
            task.loss_fn(model(x.index_select(0, index)), y.index_select(0, index)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / steps

    counts = {}
    for size in sizes:  # warm-up, and how many steps fill the window
        block(size, 2)
        counts[size] = max(3, math.ceil(window / block(size, 3)))
    for r in range(rounds):
        for size in sizes[r % len(sizes):] + sizes[: r % len(sizes)]:
            per_round[size].append(block(size, counts[size]))
    return {size: statistics.median(times) for size, times in per_round.items()}
