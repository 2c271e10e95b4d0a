"""Evaluation metrics: loss always, accuracy for class-index targets, user metrics.

A user metric is either a callable ``f(output, target) -> number``, whose batch values are
averaged weighted by batch size (right for means such as an error rate; wrong for F1, AUC or
anything that is not a mean over samples), or an object with ``update(output, target)``,
``compute()`` and ``reset()`` (torchmetrics' interface), which sees every batch and is computed
once over the whole set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Metric = Any  # Callable[[output, target], number] or an object with update / compute / reset


def is_stateful(metric: Any) -> bool:
    """Whether ``metric`` accumulates over batches (``update``/``compute``/``reset``) rather than averaging."""
    return all(callable(getattr(metric, name, None)) for name in ("update", "compute", "reset"))


def is_classification(output: Any, target: torch.Tensor | None) -> bool:
    """Targets of class indices with one score per class in the output."""
    return (
        isinstance(output, torch.Tensor)
        and target is not None
        and not target.is_floating_point()
        and not target.is_complex()
        and target.dtype != torch.bool
        and output.dim() == target.dim() + 1
        and output.shape[:-1] == target.shape
        and output.shape[-1] > 1
    )


def correct_count(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How many predictions (argmax over the last dimension) equal the target."""
    return (output.argmax(dim=-1) == target).sum()


class MetricSums:
    """Sample-weighted sums of batch metrics, read back once at the end (no per-batch sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, Any] = {}
        self.count = 0
        self.correct: torch.Tensor | None = None
        self.scored = 0
        self.stateful: dict[str, Any] = {}  # metrics computed over the whole set

    def add(self, name: str, value: Any, weight: Any) -> None:
        """Add a batch mean ``value`` that covers ``weight`` samples (or tokens: any count)."""
        value = torch.as_tensor(value).detach().float()
        term = value * weight
        if isinstance(weight, torch.Tensor):  # a batch without tokens adds nothing (its mean is NaN)
            term = torch.where(weight.to(term.device) > 0, term, 0.0)
        self.sums[name] = self.sums[name] + term if name in self.sums else term
        self.weights[name] = self.weights.get(name, 0) + weight

    def add_correct(self, correct: torch.Tensor, scored: int) -> None:
        """Add a count of correct predictions out of ``scored``."""
        self.correct = correct if self.correct is None else self.correct + correct
        self.scored += scored

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum every total over the ranks of a distributed run with one ``reduce_sum`` call.

        Every rank must hold the same metric names (each evaluated a non-empty share of the data).
        """
        names = sorted(self.sums)
        device = self.sums[names[0]].device if names else torch.device("cpu")
        values = [self.sums[n] for n in names] + [self.weights[n] for n in names]
        values += [self.correct if self.correct is not None else 0, self.scored, self.count]
        totals = reduce_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                                         for v in values]))
        k = len(names)
        self.sums = dict(zip(names, totals[:k]))
        self.weights = dict(zip(names, totals[k : 2 * k]))
        self.correct = totals[2 * k] if self.correct is not None else None
        self.scored, self.count = (int(v) for v in totals[2 * k + 1 :].tolist())

    def result(self) -> dict[str, float]:
        """Means over all samples (or all of whatever each metric's weights counted)."""
        out = {name: (total / self.weights[name]).item() for name, total in self.sums.items()}
        if self.correct is not None and self.scored:
            out["accuracy"] = self.correct.item() / self.scored
        for name, metric in self.stateful.items():
            out[name] = float(metric.compute())
        return out
