"""Probes leave no trace: snapshots of model, optimizer and random state, and probe devices.

Every measurement in :mod:`batchfit.measure` runs real forward and backward passes (and some run
optimizer steps) on the user's model. :func:`probe` makes that invisible: on exit the
parameters, buffers, gradients, train/eval modes, optimizer state and hyperparameters and the
random number generators are exactly (bit for bit) what they were on entry. Snapshots live in
host memory so that they do not take device memory away from the measurement.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..core.rng import rng_state, set_rng_state
from ..errors import InputError


def _host_copy(value: Any) -> Any:
    """A deep copy of a (nested) state with every tensor copied to host memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


@dataclass
class Snapshot:
    """What :func:`snapshot` saved; :meth:`restore` puts it back."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    tensors: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    modes: list[bool]
    optimizer_state: dict[str, Any] | None
    rng: dict[str, Any]

    def restore(self) -> None:
        """Put model, optimizer and random state back exactly as they were (once: the state is handed over)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in _named_tensors(self.model):
                tensor.copy_(self.tensors[name])
        for name, grad in self.grads.items():
            param = params[name]
            if grad is None:
                param.grad = None
            elif param.grad is not None and param.grad.shape == grad.shape and param.grad.dtype == grad.dtype:
                param.grad.copy_(grad)
            else:
                param.grad = grad.to(param.device)
        for module, training in zip(self.model.modules(), self.modes):
            module.training = training
        if self.optimizer is not None and self.optimizer_state is not None:
            # load_state_dict replaces lr and every hyperparameter as well as the state.
            self.optimizer.load_state_dict(self.optimizer_state)
        set_rng_state(self.rng)


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # All buffers, also those left out of state_dict (persistent=False).
    yield from model.named_parameters()
    yield from model.named_buffers()


def snapshot(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, cuda: bool = False
) -> Snapshot:
    """A host-memory copy of everything a probe may change (``cuda``: save GPU RNGs too)."""
    return Snapshot(
        model=model,
        optimizer=optimizer,
        tensors={name: _host_copy(t) for name, t in _named_tensors(model)},
        grads={name: None if p.grad is None else _host_copy(p.grad) for name, p in model.named_parameters()},
        modes=[m.training for m in model.modules()],
        optimizer_state=None if optimizer is None else _host_copy(optimizer.state_dict()),
        rng=rng_state(cuda),
    )


@contextlib.contextmanager
def preserved(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, cuda: bool = False
) -> Iterator[Snapshot]:
    """Run the body, then restore model, optimizer and RNGs bit-exactly, also after an error."""
    saved = snapshot(model, optimizer, cuda=cuda)
    try:
        yield saved
    finally:
        saved.restore()


def _optimizer_for(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, twin: torch.nn.Module
) -> torch.optim.Optimizer:
    """A copy of ``optimizer`` (same class, hyperparameters and state) over ``twin``'s parameters."""
    twin_of = {id(p): q for p, q in zip(model.parameters(), twin.parameters())}
    if any(id(p) not in twin_of for group in optimizer.param_groups for p in group["params"]):
        raise InputError(
            "`optimizer` holds parameters that are not the model's, so the probe cannot move it to another "
            "device. Move the model to the probe device before creating the optimizer."
        )
    twin_optimizer = copy.deepcopy(optimizer, memo=dict(twin_of))  # the twin's parameters stand in
    # An lr scheduler wraps `step` with a reference to the original optimizer; use the class's own.
    twin_optimizer.__dict__.pop("step", None)
    twin_optimizer.load_state_dict(twin_optimizer.state_dict())  # moves the state to the twin's device
    return twin_optimizer


@contextlib.contextmanager
def probe(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
) -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer | None]]:
    """``(model, optimizer)`` on ``device`` for a probe that must leave no trace.

    When the model already lives on ``device`` the probe works on it and everything is restored
    afterwards. Otherwise it works on a copy moved to ``device`` (with an optimizer of the same
    kind and state) and the originals are never touched. Random state is restored in both cases.
    """
    cuda = device.type == "cuda"
    on_device = all(p.device == device for p in model.parameters())
    if on_device:
        with preserved(model, optimizer, cuda=cuda):
            yield model, optimizer
        return
    rng = rng_state(cuda)
    twin = copy.deepcopy(model).to(device)
    twin_optimizer = None if optimizer is None else _optimizer_for(optimizer, model, twin)
    try:
        yield twin, twin_optimizer
    finally:
        del twin, twin_optimizer
        set_rng_state(rng)
