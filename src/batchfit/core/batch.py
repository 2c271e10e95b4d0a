"""How a batch meets a model: structure, size, slicing, device copies, forward, loss, micro-batches.

Tuple batches: the last element is the target, the others are the model's inputs, and the
loss is ``loss_fn(model(*inputs), target)``. Dict batches are passed as ``model(**batch)``;
an output with a ``.loss`` (Hugging Face models) is used as is, otherwise the loss is
``loss_fn(output, batch)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch

from ..errors import BatchfitError

Batch = Union[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]  # noqa: UP007 (runtime alias, 3.10)
LossFn = Callable[..., torch.Tensor]


def batch_len(batch: Batch) -> int:
    """Number of samples in a batch."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``[start, stop)`` of a batch, as views."""
    if isinstance(batch, dict):
        return {k: v[start:stop] for k, v in batch.items()}
    return tuple(t[start:stop] for t in batch)


def tensors_of(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch, in order."""
    return list(batch.values()) if isinstance(batch, dict) else list(batch)


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
    """The batch on ``device`` (non-blocking on CUDA), floating tensors cast to ``dtype``.

    The one way a batch reaches a model: the trainer, evaluation and every probe copy batches
    with it, so float64 NumPy data meets a float32 model as float32 everywhere.
    """
    non_blocking = device.type == "cuda"

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        cast = dtype if (dtype is not None and t.is_floating_point() and t.dtype != dtype) else None
        return t.to(device=device, dtype=cast, non_blocking=non_blocking)

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    return tuple(move(t) for t in batch)


def param_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter: what floating inputs are cast to."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def forward(model: torch.nn.Module, batch: Batch) -> Any:
    """The model's output for a batch."""
    if isinstance(batch, dict):
        return model(**model_inputs(model, batch))
    if len(batch) == 1:
        return model(batch[0])
    return model(*batch[:-1])


LENGTHS = "_lengths"


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keywords a dict batch passes to ``model``: ``NAME_lengths`` (variable-length arrays of
    shards) only when ``forward`` names it; otherwise ``input_ids_lengths`` becomes the
    ``attention_mask`` a model that takes one needs, and other lengths are left out.

    Models that take ``**kwargs`` (Hugging Face's) would accept the lengths silently and then
    attend to padding; a mask built from the true lengths is what they need.
    """
    lengths = [key for key in batch if key.endswith(LENGTHS) and key[: -len(LENGTHS)] in batch]
    if not lengths:
        return batch
    named = _named_parameters(type(_unwrapped(model)))
    inputs = dict(batch)
    for key in lengths:
        if key in named:
            continue
        length = inputs.pop(key)
        values = inputs[key[: -len(LENGTHS)]]
        if key == "input_ids" + LENGTHS and "attention_mask" in named and "attention_mask" not in inputs:
            positions = torch.arange(values.shape[1], device=values.device)
            inputs["attention_mask"] = (positions < length.to(values.device)[:, None]).to(torch.long)
    return inputs


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` decides the arguments: DDP's and ``torch.compile``'s wrappers removed."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return _unwrapped(inner)
    return model


_NAMED: dict[type, frozenset[str]] = {}


def _named_parameters(kind: type[torch.nn.Module]) -> frozenset[str]:
    """The parameter names ``kind.forward`` declares (``**kwargs`` names none); looked up once a class."""
    if kind not in _NAMED:
        try:
            parameters = list(inspect.signature(kind.forward).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        _NAMED[kind] = frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return _NAMED[kind]


def loss_of(output: Any, batch: Batch, loss_fn: LossFn | None) -> torch.Tensor:
    """The (mean) loss of a batch given the model's output."""
    if isinstance(batch, dict):
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is not None:
            return loss
        if loss_fn is None:
            raise BatchfitError("`loss_fn` is required when the model output has no `.loss`. Received: loss_fn=None")
        return loss_fn(output, batch)
    if loss_fn is None:
        raise BatchfitError("`loss_fn` is required for tuple batches. Received: loss_fn=None")
    if len(batch) == 1:
        raise BatchfitError(
            "A tuple batch needs a target as its last element. Received: a batch with 1 element"
        )
    return loss_fn(output, batch[-1])


def forward_loss(model: torch.nn.Module, loss_fn: LossFn | None, batch: Batch) -> tuple[torch.Tensor, Any]:
    """``(loss, output)`` of one forward pass; the loss must be a scalar tensor (the batch's mean)."""
    output = forward(model, batch)
    loss = loss_of(output, batch, loss_fn)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        received = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
        raise BatchfitError(f"`loss_fn` must return a scalar tensor, the mean loss of the batch (reduce it with "
                            f".mean(), or use reduction='mean'). Received: {received}")
    return loss, output


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
