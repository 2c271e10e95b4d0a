"""How a batch meets a model: forward, loss, size, splitting into micro-batches.

Tuple batches: the last element is the target, the others are the model's inputs, and the
loss is ``loss_fn(model(*inputs), target)``. Dict batches are passed as ``model(**batch)``;
an output with a ``.loss`` (Hugging Face models) is used as is, otherwise the loss is
``loss_fn(output, batch)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..data.sources import Batch, slice_batch

LossFn = Callable[..., torch.Tensor]


def batch_len(batch: Batch) -> int:
    """Number of samples in a batch."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


def forward(model: torch.nn.Module, batch: Batch) -> Any:
    """The model's output for a batch."""
    if isinstance(batch, dict):
        return model(**batch)
    if len(batch) == 1:
        return model(batch[0])
    return model(*batch[:-1])


def loss_of(output: Any, batch: Batch, loss_fn: LossFn | None) -> torch.Tensor:
    """The (mean) loss of a batch given the model's output."""
    if isinstance(batch, dict):
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is not None:
            return loss
        if loss_fn is None:
            raise ValueError("`loss_fn` is required when the model output has no `.loss`. Received: loss_fn=None")
        return loss_fn(output, batch)
    if loss_fn is None:
        raise ValueError("`loss_fn` is required for tuple batches. Received: loss_fn=None")
    if len(batch) == 1:
        raise ValueError(
            "A tuple batch needs a target as its last element. Received: a batch with 1 element"
        )
    return loss_fn(output, batch[-1])


def forward_loss(model: torch.nn.Module, loss_fn: LossFn | None, batch: Batch) -> tuple[torch.Tensor, Any]:
    """``(loss, output)`` of one forward pass."""
    output = forward(model, batch)
    return loss_of(output, batch, loss_fn), output


def target_of(batch: Batch) -> torch.Tensor | None:
    """The target of a batch: last tuple element, or ``labels``/``y``/``target`` of a dict."""
    if isinstance(batch, dict):
        for key in ("labels", "label", "y", "target", "targets"):
            if key in batch:
                return batch[key]
        return None
    return batch[-1] if len(batch) > 1 else None


def micro_batches(batch: Batch, micro_batch_size: int | None) -> Iterator[tuple[Batch, int]]:
    """``(micro_batch, its size)`` pieces of a batch, at most ``micro_batch_size`` each."""
    size = batch_len(batch)
    if micro_batch_size is None or micro_batch_size >= size:
        yield batch, size
        return
    for start in range(0, size, micro_batch_size):
        stop = min(start + micro_batch_size, size)
        yield slice_batch(batch, start, stop), stop - start
