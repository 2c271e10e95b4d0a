"""Evaluation metrics: loss always, accuracy for class-index targets, user callables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Metric = Callable[[Any, torch.Tensor], Any]


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

    def add(self, name: str, value: Any, weight: Any) -> None:
        """Add a batch mean ``value`` that covers ``weight`` samples (or tokens: any count)."""
        value = torch.as_tensor(value).detach().float()
        self.sums[name] = self.sums[name] + value * weight if name in self.sums else value * weight
        self.weights[name] = self.weights.get(name, 0) + weight

    def add_correct(self, correct: torch.Tensor, scored: int) -> None:
        """Add a count of correct predictions out of ``scored``."""
        self.correct = correct if self.correct is None else self.correct + correct
        self.scored += scored

    def result(self) -> dict[str, float]:
        """Means over all samples (or all of whatever each metric's weights counted)."""
        out = {name: (total / self.weights[name]).item() for name, total in self.sums.items()}
        if self.correct is not None and self.scored:
            out["accuracy"] = self.correct.item() / self.scored
        return out
