"""Sharded data parallelism (``strategy="fsdp"``): the model's weights, gradients and optimizer state
split over the ranks with PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`).

Each transformer block is sharded on its own (its weights are gathered for its forward and
backward only), then the root takes what is left. The blocks are the modules whose class a
Hugging Face model names in ``_no_split_modules`` (``LlamaDecoderLayer``, ...), else the entries
of a ``layers``/``h``/``blocks`` ModuleList, unless the caller gives ``shard`` (module classes, or
a predicate ``shard(module) -> bool``). Gradients are averaged over ranks like DDP's, so
:class:`~batchfit.core.step.Step` weighs losses the same way; gradient sync between
micro-batches is turned off with ``set_requires_gradient_sync``.

``fully_shard`` replaces every parameter with a new (DTensor) one: the optimizer, built by the
caller on the original parameters, is pointed at the new ones by name. That is possible only
while the optimizer holds no state yet.

Full (unsharded) weights are gathered with :func:`full_model_state` (a collective: every rank calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import torch

from .errors import InputError, expected

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
# What says which submodules are sharded on their own: module classes, or a predicate.
ShardPolicy = Union[Sequence[type], Callable[[torch.nn.Module], bool]]  # noqa: UP007
_BLOCK_LISTS = ("layers", "h", "blocks")  # names under which models keep their transformer blocks


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` has been wrapped by ``fully_shard`` (its parameters are DTensors)."""
    return hasattr(model, "set_requires_gradient_sync") and hasattr(model, "reshard")


def check_shard(shard: Any) -> None:
    """Refuse a ``shard`` that is neither None, a sequence of module classes nor a callable."""
    if shard is None or callable(shard) and not isinstance(shard, type):
        return
    if isinstance(shard, (list, tuple)) and shard and all(isinstance(k, type) and issubclass(k, torch.nn.Module)
                                                          for k in shard):
        return
    raise expected("shard", "None, a list of torch.nn.Module classes, or a callable module -> bool", shard)


def blocks(model: torch.nn.Module, shard: ShardPolicy | None = None) -> list[torch.nn.Module]:
    """The submodules sharded on their own, in the order of ``model.modules()`` (the root excluded)."""
    if shard is not None:
        if callable(shard) and not isinstance(shard, (list, tuple)):
            test: Callable[[torch.nn.Module], bool] = shard
        else:
            kinds = tuple(shard)
            def test(module: torch.nn.Module) -> bool:
                return isinstance(module, kinds)
        return [m for m in model.modules() if m is not model and test(m)]
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if found:
            return found
    for module in model.modules():
        for attribute in _BLOCK_LISTS:
            found_list = getattr(module, attribute, None)
            if isinstance(found_list, torch.nn.ModuleList) and len(found_list) > 0:
                return list(found_list)
    return []


def shard_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                shard: ShardPolicy | None = None) -> list[str]:
    """Wrap ``model`` in place with ``fully_shard`` (its blocks, then the root) and point ``optimizer`` at
    the sharded parameters; returns the names of the modules sharded on their own."""
    from torch.distributed.fsdp import fully_shard

    if optimizer.state:
        raise InputError("strategy='fsdp' needs an optimizer that has not stepped yet (it holds state for "
                            "the unsharded parameters, which sharding replaces): build the Trainer before training")
    by_id = {id(p): name for name, p in model.named_parameters()}
    group_names = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in by_id]
        if missing:
            raise InputError(f"strategy='fsdp': the optimizer holds {len(missing)} tensors that are not "
                                f"parameters of the model; sharding can only replace the model's own")
        group_names.append([by_id[id(p)] for p in group["params"]])
    named = {id(m): name for name, m in model.named_modules()}
    found = blocks(model, shard)
    for module in found:
        fully_shard(module)
    fully_shard(model)
    params = dict(model.named_parameters())
    for group, names in zip(optimizer.param_groups, group_names):
        group["params"] = [params[name] for name in names]
    return [named[id(m)] for m in found]


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights of a sharded ``model`` on the CPU of rank 0 (empty elsewhere);
    a collective, every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards of DTensors)."""

    def size(t: Any) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = list(model.parameters())
    state = sum(size(v) for s in optimizer.state.values() for v in s.values())
    return {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params),
            "optimizer": state}
