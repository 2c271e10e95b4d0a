"""Gradient norms."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def squared_grad_norm(grads: Iterable[torch.Tensor | None]) -> float:
    """``Σ_i |g_i|²`` over gradient tensors (``None`` counts as zero); one device sync in all."""
    norms = [
        torch.linalg.vector_norm(g.detach(), dtype=torch.promote_types(g.dtype, torch.float32))
        for g in grads
        if g is not None
    ]
    if not norms:
        return 0.0
    device = norms[0].device
    return float(torch.stack([n.to(device) for n in norms]).double().pow(2).sum())
