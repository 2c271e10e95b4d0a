"""Devices: one resolver for the trainer and every probe."""

from __future__ import annotations

import torch

from ..errors import InputError, expected


def resolve_device(device: str | torch.device, model: torch.nn.Module | None = None) -> torch.device:
    """The device to compute on.

    ``"auto"`` is the ``model``'s device when it is given and not on the CPU, else the first GPU
    when there is one, else the CPU. Anything else must be a valid device this machine has; a
    CUDA device gets its index (``cuda`` becomes ``cuda:N``) so it compares equal to a tensor's.
    """
    if isinstance(device, str) and device == "auto":
        if model is not None:
            for tensor in model.parameters():
                if tensor.device.type != "cpu":
                    return tensor.device
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise expected("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", device) from error
    if resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise expected("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"`device` must be a device this machine has. Received: device={device!r}, "
                                f"but CUDA is not available")
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise expected("device", f"a CUDA device below cuda:{torch.cuda.device_count()}", device)
        resolved = torch.device("cuda", index)
    return resolved


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): what timing a step needs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
