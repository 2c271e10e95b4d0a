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

from ..errors import InputError

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
        if cast is None and t.device == device:
            return t  # what .to() would return, without its call
        return t.to(device=device, dtype=cast, non_blocking=non_blocking)

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    return tuple([move(t) for t in batch])


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
IGNORE_INDEX = -100  # the target of a padded or masked token: PyTorch's and Hugging Face's convention


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
    if "labels" + LENGTHS in inputs:
        inputs["labels"] = padded_labels(inputs)
    for key in lengths:
        if key in named:
            continue
        length = inputs.pop(key)
        values = inputs[key[: -len(LENGTHS)]]
        if key == "input_ids" + LENGTHS and "attention_mask" in named and "attention_mask" not in inputs:
            inputs["attention_mask"] = _within(values, length).to(torch.long)
    return inputs


def _within(values: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``(rows, width)`` booleans: which positions of padded ``values`` hold data."""
    positions = torch.arange(values.shape[1], device=values.device)
    return positions < length.to(values.device)[:, None]


def padded_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``batch["labels"]`` with the padding past ``labels_lengths`` (when given) set to -100, the
    index every loss of PyTorch and Hugging Face ignores, whatever value the shards padded with."""
    labels = batch["labels"]
    length = batch.get("labels" + LENGTHS)
    if length is None or labels.dim() < 2:
        return labels
    return labels.masked_fill(~_within(labels, length), IGNORE_INDEX)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` predicts each token from the ones before it and shifts its labels itself
    (Hugging Face's ``*ForCausalLM`` / ``*LMHeadModel`` classes, under DDP, compile or peft wrappers)."""
    seen: torch.nn.Module | None = model
    while seen is not None:
        if type(seen).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            return True
        inner = next((getattr(seen, name) for name in ("module", "_orig_mod", "base_model")
                      if isinstance(getattr(seen, name, None), torch.nn.Module)), None)
        seen = inner if inner is not seen else None
    return False


def has_token_labels(batch: Batch) -> bool:
    """Whether ``batch`` is a dict whose ``labels`` hold one target per token (2-D or more)."""
    return isinstance(batch, dict) and "labels" in batch and batch["labels"].dim() >= 2


def token_count(model: torch.nn.Module, batch: Batch) -> torch.Tensor | None:
    """The number of target tokens a model's own mean loss averages over, or ``None`` when its loss
    is a mean over samples.

    A dict batch with 2-D ``labels`` (one target per token) counts the labels that are not -100
    (nor padding past ``labels_lengths``); a causal language model predicts token ``t + 1`` from
    position ``t``, so its first label is never a target and is left out of the count.
    """
    if not has_token_labels(batch):
        return None
    assert isinstance(batch, dict)
    labels = padded_labels(batch)
    if is_causal_lm(model):
        labels = labels[:, 1:]
    return (labels != IGNORE_INDEX).sum()


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
            raise InputError("`loss_fn` is required when the model output has no `.loss`. Received: loss_fn=None")
        return loss_fn(output, batch)
    if loss_fn is None:
        raise InputError("`loss_fn` is required for tuple batches. Received: loss_fn=None")
    if len(batch) == 1:
        raise InputError(
            "A tuple batch needs a target as its last element. Received: a batch with 1 element"
        )
    return loss_fn(output, batch[-1])


def forward_loss(model: torch.nn.Module, loss_fn: LossFn | None, batch: Batch) -> tuple[torch.Tensor, Any]:
    """``(loss, output)`` of one forward pass; the loss must be a scalar tensor (the batch's mean)."""
    output = forward(model, batch)
    loss = loss_of(output, batch, loss_fn)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        received = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
        raise InputError(f"`loss_fn` must return a scalar tensor, the mean loss of the batch (reduce it with "
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


def micro_batches(batch: Batch, micro_batch_size: int | None,
                  micro_batch_tokens: int | None = None) -> Iterator[tuple[Batch, int]]:
    """``(micro_batch, its size)`` pieces of a batch, at most ``micro_batch_size`` samples each.

    With ``micro_batch_tokens`` the batch's samples are first sorted by length (longest first)
    and cut so that no piece holds more than that many padded tokens (rows times its longest
    sequence, at least one sample a piece), each piece trimmed to its own longest sequence: memory
    is bounded by tokens and little is padded, while the pieces together are still exactly the
    samples of the batch.
    """
    size = batch_len(batch)
    if micro_batch_tokens is not None:
        yield from _token_pieces(batch, size, micro_batch_size, micro_batch_tokens)
        return
    if micro_batch_size is None or micro_batch_size >= size:
        yield batch, size
        return
    for start in range(0, size, micro_batch_size):
        stop = min(start + micro_batch_size, size)
        yield slice_batch(batch, start, stop), stop - start


def sample_lengths(batch: Batch) -> torch.Tensor:
    """Each sample's length: the longest of its variable-length arrays (``NAME_lengths`` keys)."""
    keys = _length_keys(batch)
    if not keys:
        raise InputError(
            "micro_batch_tokens needs variable-length arrays: a dict batch with NAME and NAME_lengths "
            "(as ragged shards give), to count tokens by. Received: a batch with keys "
            f"{sorted(batch) if isinstance(batch, dict) else f'(tuple of {len(batch)})'}")
    assert isinstance(batch, dict)
    lengths = batch[keys[0]]
    for key in keys[1:]:
        lengths = torch.maximum(lengths, batch[key])
    return lengths


def _length_keys(batch: Batch) -> list[str]:
    if not isinstance(batch, dict):
        return []
    return [key for key in batch if key.endswith(LENGTHS) and key[: -len(LENGTHS)] in batch]


def _token_pieces(batch: Batch, size: int, most_rows: int | None, budget: int) -> Iterator[tuple[Batch, int]]:
    lengths = sample_lengths(batch).cpu()
    order = torch.argsort(lengths, descending=True, stable=True)
    ordered = lengths[order].tolist()
    start = 0
    while start < size:
        rows = max(1, budget // max(1, ordered[start]))  # the first row of a piece is its longest
        stop = min(size, start + (rows if most_rows is None else min(rows, most_rows)))
        yield _trimmed(batch, order[start:stop]), stop - start
        start = stop


def _trimmed(batch: Batch, rows: torch.Tensor) -> Batch:
    """Rows ``rows`` of a dict batch, each variable-length array cut to their longest sequence
    (and any other 2-D array padded to the same width, such as a user's own ``attention_mask``)."""
    assert isinstance(batch, dict)
    picked = {key: value.index_select(0, rows.to(value.device)) for key, value in batch.items()}
    widths: dict[int, int] = {}
    for key in _length_keys(batch):
        name = key[: -len(LENGTHS)]
        width = int(picked[key].max()) if len(rows) else 0
        widths.setdefault(batch[name].shape[1], width)
        picked[name] = picked[name][:, :width]
    for key, value in picked.items():
        if key.endswith(LENGTHS) or key + LENGTHS in batch or value.dim() < 2:
            continue
        if value.shape[1] in widths:
            picked[key] = value[:, : widths[value.shape[1]]]
    return picked
