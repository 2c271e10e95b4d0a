"""Precision: which dtype a forward pass computes in, and the context that makes it so."""

from __future__ import annotations

import contextlib
from typing import Any, Literal, get_args

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# fp32 runs in the weights' own dtype; the others run the forward pass under autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NO_CONTEXT = contextlib.nullcontext()


def autocast(precision: str, device_type: str) -> Any:
    """The context a forward pass of ``precision`` runs in: autocast for bf16/fp16, nothing for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return _NO_CONTEXT if dtype is None else torch.autocast(device_type, dtype=dtype)
