"""Activation (gradient) checkpointing: keep fewer activations, recompute them in the backward pass."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import InputError


def enable_gradient_checkpointing(model: torch.nn.Module) -> str:
    """Make ``model`` recompute its blocks' activations during the backward pass; returns how.

    A Hugging Face model uses its own switch (``activation_checkpointing_enable``, or
    ``gradient_checkpointing_enable`` before transformers 5; non-reentrant,
    which also turns off its key/value cache). Any other model has the blocks of its first
    ``nn.ModuleList`` / ``nn.Sequential`` of two or more modules (breadth first: a transformer's
    layers, a ResNet's stages) run under ``torch.utils.checkpoint``: only each block's input is
    kept, and the block runs again when its gradient is needed — about a third more compute for
    activation memory that no longer grows with depth. The weights and the gradients are those of
    the model without checkpointing; under autocast the recomputation repeats the same casts.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif callable(enable := getattr(model, "gradient_checkpointing_enable", None)):
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if callable(enable):
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False  # a cache is useless in training and conflicts with recomputation
        return f"the model's own {enable.__name__}()"
    blocks = _blocks(model)
    if blocks is None:
        raise InputError(
            "gradient_checkpointing=True needs blocks to recompute: a Hugging Face model, or a model with an "
            f"nn.ModuleList or nn.Sequential of two or more modules. Received: {type(model).__name__} without either")
    name, container = blocks
    children = list(container.children())
    for block in children:
        if not getattr(block, "_batchfit_recomputed", False):
            block.forward = functools.partial(_recomputed, block.forward)
            setattr(block, "_batchfit_recomputed", True)  # noqa: B010 (Module.__setattr__ is typed for tensors)
    return f"torch.utils.checkpoint around each of the {len(children)} blocks of {name or 'the model'}"


def _blocks(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The first container of two or more blocks, breadth first, with its name."""
    queue: list[tuple[str, torch.nn.Module]] = [("", model)]
    while queue:
        name, module = queue.pop(0)
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and len(module) >= 2:
            return name, module
        queue += [(f"{name}.{child}" if name else child, m) for child, m in module.named_children()]
    return None


def _recomputed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation: nothing to keep or recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
