"""Per-batch transforms: applied to whole batches (vectorised), in the batcher's thread or workers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.batch import Batch
from ..errors import expected


class ToFloat:
    """Integer inputs (uint8 images, say) to float32, scaled and optionally normalised per channel.

    ``x → (x · scale − mean) / std``, with ``mean``/``std`` per channel (dimension 1 of each
    input) or scalars. A tuple batch converts every element but the last (the target); a dict
    batch converts the arrays named in ``keys``. Pass it as ``transform=bf.ToFloat()``.
    """

    def __init__(self, scale: float = 1 / 255, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, keys: Sequence[str] | None = None) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise expected("scale", "a positive number", scale)
        if (mean is None) != (std is None):
            raise expected("std", "given together with mean (or neither)", std)
        if std is not None and any(v <= 0 for v in ([std] if isinstance(std, (int, float)) else std)):
            raise expected("std", "positive values", std)
        if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str) for k in keys)):
            raise expected("keys", "a list of array names", keys)
        self.scale, self.keys = float(scale), None if keys is None else tuple(keys)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    def _convert(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(torch.float32) * self.scale
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (out.dim() - 2) if self.mean.dim() else ()
            out = (out - self.mean.reshape(shape)) / self.std.reshape(shape)
        return out

    def __call__(self, batch: Batch) -> Batch:
        if isinstance(batch, dict):
            if self.keys is None:
                raise expected("keys", "the names of the arrays to convert, for dict batches", None)
            missing = [k for k in self.keys if k not in batch]
            if missing:
                raise expected("keys", f"names of the batch's arrays {sorted(batch)}", missing)
            return {k: self._convert(v) if k in self.keys else v for k, v in batch.items()}
        if len(batch) == 1:  # inputs only (predict)
            return (self._convert(batch[0]),)
        return (*(self._convert(t) for t in batch[:-1]), batch[-1])

    def __repr__(self) -> str:
        return f"ToFloat(scale={self.scale:g}, mean={self.mean}, std={self.std}, keys={self.keys})"
