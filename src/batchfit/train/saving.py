"""Trained models on disk: weights plus the configuration that made them, loaded without running code.

A saved model is one file written atomically with ``torch.save`` and read with
``torch.load(weights_only=True)``: ``{"format": "batchfit-model", "version": 1, "model": state
dict, "config": the resolved training configuration, "model_class": "module.QualName"}``.
Weights are stored without the ``_orig_mod.`` prefix ``torch.compile`` adds, so a compiled and
an uncompiled model save the same file and either loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..core.durable import atomic_write, failed_write
from ..errors import CheckpointError, expected

FORMAT = "batchfit-model"
COMPILED_PREFIX = "_orig_mod."


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose weights are saved: DDP's ``.module`` and ``torch.compile``'s ``_orig_mod`` unwrapped."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
            else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_adapter_model(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a base model frozen under trained adapters (a peft model, e.g. LoRA)."""
    return hasattr(plain_module(module), "peft_config")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that checkpoints and saved models keep: all of them, or, for an adapter model
    (LoRA through peft), only the trained adapter weights — megabytes instead of the whole base
    model, which the caller loads again from its own files."""
    module = plain_module(model)
    state = module.state_dict()
    if is_adapter_model(module):
        trained = {name for name, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, Any], where: str) -> None:
    """Load weights kept by :func:`model_state` into ``model`` after checking their names and shapes."""
    module = plain_module(model)
    state = {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}
    refuse_other_weights(state, model_state(module), where)
    module.load_state_dict(state, strict=not is_adapter_model(module))


def save_model(model: torch.nn.Module, path: str | os.PathLike[str], config: dict[str, Any] | None = None,
               *, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s weights (and ``config``) to ``path`` atomically; returns the path.

    ``state``: the whole weights when ``model``'s own are sharded (gathered by the caller); an
    adapter model keeps only its trained weights of them, as always.
    """
    if not isinstance(model, torch.nn.Module):
        raise expected("model", "a torch.nn.Module", type(model).__name__)
    module = plain_module(model)
    if state is None:
        state = model_state(module)
    elif is_adapter_model(module):
        trained = {name for name, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    state = {k.removeprefix(COMPILED_PREFIX): v.detach().cpu() for k, v in state.items()}
    kind = type(module)
    record = {"format": FORMAT, "version": 1, "model": state, "config": dict(config or {}),
              "model_class": f"{kind.__module__}.{kind.__qualname__}"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, lambda handle: torch.save(record, handle))
    except (OSError, RuntimeError) as error:
        failure = failed_write(error, path, "the model")
        if failure is None:
            raise
        raise failure from error


def read_saved(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The saved record (weights, config, model class) of a file written by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise expected("path", "a model file written by Trainer.save or batchfit train", str(path))
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged, or not a torch file
        raise CheckpointError(f"cannot read saved model {path}: {type(error).__name__}: {error}") from error
    if isinstance(record, dict) and record.get("format") == FORMAT:
        return record
    if isinstance(record, dict) and "model" in record and "step" in record:  # a training checkpoint
        return {"format": FORMAT, "version": 1, "model": record["model"], "config": record.get("config", {}),
                "model_class": None}
    raise CheckpointError(f"{path} is not a saved batchfit model (nor a training checkpoint)")


def load_model(path: str | os.PathLike[str], model: torch.nn.Module, strict: bool = True) -> torch.nn.Module:
    """Load the weights saved at ``path`` (a saved model or a training checkpoint) into ``model``; returns it.

    ``model`` is built by the caller, as for training (weights files hold no code). A compiled
    model loads an uncompiled one's weights and the other way round. Names and shapes are checked
    first: a model of another shape raises a :class:`~batchfit.CheckpointError` saying which
    weights differ, and ``model`` is left untouched.
    """
    if not isinstance(model, torch.nn.Module):
        raise expected("model", "a torch.nn.Module to load the weights into", type(model).__name__)
    record = read_saved(path)
    target = plain_module(model)
    saved = {k.removeprefix(COMPILED_PREFIX): v for k, v in record["model"].items()}
    refuse_other_weights(saved, model_state(target), str(path), strict)
    target.load_state_dict(saved, strict=strict and not is_adapter_model(target))
    return model


def refuse_other_weights(saved: dict[str, Any], mine: dict[str, Any], where: str, strict: bool = True) -> None:
    """Raise a :class:`~batchfit.CheckpointError` naming (up to three of) the weights whose names or shapes
    differ between ``saved`` and this model's ``mine``; nothing is loaded before."""
    problems = [f"{name} is missing" for name in mine if name not in saved and strict]
    problems += [f"{name} is not in this model" for name in saved if name not in mine and strict]
    problems += [f"{name} has shape {tuple(saved[name].shape)} there, {tuple(value.shape)} here"
                 for name, value in mine.items() if name in saved and tuple(saved[name].shape) != tuple(value.shape)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{where} holds weights of another model: {'; '.join(problems[:3])}{more}")
