"""The Trainer's options: their allowed values, their checks, and the resolved settings of a run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.order import SHUFFLES
from ..errors import BatchfitError, check_choice, check_positive_int, expected
from .callbacks import Callback

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the others run in the weights' dtype
ON_NAN = ("raise", "skip", "rollback")
LR_RULES = (None, "linear", "sqrt", "adascale")
BATCH_MODES = ("full", "auto", "adaptive")
# Steps between two noise-scale measurements (each splits its batch in two micro-batches).
NOISE_EVERY = 4
# Settings that must match for a checkpoint to be resumed.
RESUME_KEYS = ("batch_size", "shuffle", "drop_last", "seed", "num_samples")


@dataclass
class Settings:
    """The resolved configuration of a run, saved inside every checkpoint."""

    batch_size: int | str
    micro_batch_size: int | str | None
    shuffle: bool | str
    drop_last: bool
    lr_scaling: str | None
    base_batch_size: int | None
    warmup_steps: int
    precision: str
    max_grad_norm: float | None
    on_nan: str
    checkpoint_every: int | None
    keep_checkpoints: int
    seed: int


def check_options(model: Any, loss_fn: Any, optimizer: Any, batch_size: Any, micro_batch_size: Any, shuffle: Any,
                  drop_last: Any, lr_scaling: Any, base_batch_size: Any, warmup_steps: Any, precision: Any,
                  on_nan: Any, max_grad_norm: Any, checkpoint_dir: str | os.PathLike[str] | None,
                  checkpoint_every: Any, keep_checkpoints: Any, eval_batch_size: Any, max_batch_size: Any,
                  callbacks: Sequence[Any], seed: Any) -> None:
    """Refuse a bad Trainer option early, naming it, what was expected and what was received."""
    if not isinstance(model, torch.nn.Module):
        raise expected("model", "a torch.nn.Module", type(model).__name__)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise expected("optimizer", "a torch.optim.Optimizer", type(optimizer).__name__)
    if loss_fn is not None and not callable(loss_fn):
        raise expected("loss_fn", "a callable (output, target) -> loss, or None", loss_fn)
    check_batch_size(batch_size)
    if micro_batch_size is not None and micro_batch_size != "auto":
        check_positive_int("micro_batch_size", micro_batch_size)
        if isinstance(batch_size, int) and micro_batch_size > batch_size:
            raise expected("micro_batch_size", f"at most batch_size={batch_size}", micro_batch_size)
    check_choice("shuffle", shuffle, SHUFFLES)
    if not isinstance(drop_last, bool):
        raise expected("drop_last", "True or False", drop_last)
    check_choice("lr_scaling", lr_scaling, LR_RULES)
    if lr_scaling is not None:
        if base_batch_size is None:
            raise expected("base_batch_size", "the batch size the optimizer's lr was tuned for "
                           "(required with lr_scaling)", base_batch_size)
    if base_batch_size is not None:
        check_positive_int("base_batch_size", base_batch_size)
    check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
    check_choice("precision", precision, PRECISIONS)
    check_choice("on_nan", on_nan, ON_NAN)
    if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float)) or max_grad_norm <= 0):
        raise expected("max_grad_norm", "a positive number or None", max_grad_norm)
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            raise expected("checkpoint_dir", "a folder when checkpoint_every is set", None)
    if on_nan == "rollback" and checkpoint_dir is None:
        raise expected("checkpoint_dir", "a folder when on_nan='rollback'", None)
    check_positive_int("keep_checkpoints", keep_checkpoints)
    if eval_batch_size is not None:
        check_positive_int("eval_batch_size", eval_batch_size)
    if max_batch_size is not None:
        check_positive_int("max_batch_size", max_batch_size)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise expected("callbacks", "a sequence of batchfit Callback objects", type(cb).__name__)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise expected("seed", "a non-negative integer", seed)


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, str):
        if batch_size not in BATCH_MODES:
            raise expected("batch_size", "a positive integer, 'full', 'auto' or 'adaptive'", batch_size)
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise expected("batch_size", "a positive integer, 'full', 'auto' or 'adaptive'", batch_size)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else must be a valid, present device.

    A CUDA device gets its index (``cuda`` becomes ``cuda:N``), so it compares equal to a tensor's.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise expected("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", device) from error
    if resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise expected("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BatchfitError(f"`device` must be a device this machine has. Received: device={device!r}, "
                                f"but CUDA is not available")
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise expected("device", f"a CUDA device below cuda:{torch.cuda.device_count()}", device)
        resolved = torch.device("cuda", index)
    return resolved


def autocast(precision: str, device_type: str) -> Any:
    """The context a forward pass of ``precision`` runs in: autocast for bf16/fp16, nothing for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
