"""The batch plan of a run, resolved once before the first step: batch size, micro-batch size, policy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.batch import LossFn
from ..data.sources import Source
from ..distributed import DistContext
from ..errors import InputError, expected
from ..measure.auto import AdaptiveBatch, BatchChoice, choose_batch_size
from ..measure.memory import find_micro_batch_size, find_micro_batch_tokens
from ..sharding import is_sharded
from .options import TrainerOptions

logger = logging.getLogger("batchfit")


@dataclass
class BatchPlan:
    """``batch_size`` to start with, ``micro_batch_size`` (``None``: the whole share at once), the
    adaptive policy (``None`` unless ``batch_size="adaptive"``) and the measurement behind an
    ``"auto"``/``"adaptive"`` choice (``None`` when given or resumed)."""

    batch_size: int
    micro_batch_size: int | None
    adaptive: AdaptiveBatch | None = None
    choice: BatchChoice | None = None
    micro_batch_tokens: int | None = None


def plan_batches(options: TrainerOptions, module: torch.nn.Module, loss_fn: LossFn | None,
                 optimizer: torch.optim.Optimizer, src: Source, device: torch.device, dist: DistContext,
                 base_lrs: Sequence[float], saved: dict[str, Any] | None = None) -> BatchPlan:
    """Resolve the options' batch sizes for ``src``: measured, or taken from the checkpoint ``saved``."""
    choice = None
    adaptive = None
    if options.batch_size == "full":
        batch_size = len(src)
    elif options.measured_batch and saved is not None:
        # Resuming: the measured choice is part of the run, not measured again.
        batch_size = int(saved["batcher"]["batch_size"])
        if options.batch_size == "adaptive":
            adaptive = AdaptiveBatch(start=batch_size, max_batch=len(src))
    elif options.measured_batch:
        choice = choose_batch_size(module, loss_fn, optimizer, src, device=device, precision=options.precision,
                                   seed=options.seed, lr_scaling=options.lr_scaling,
                                   base_batch_size=options.base_batch_size, base_lrs=base_lrs,
                                   max_batch=options.max_batch_size)
        batch_size = choice.batch_size
        if dist.enabled:
            # Each rank measured its own throughput; all must train with the same batch size: rank 0's.
            mine = torch.tensor([batch_size if dist.is_main else 0], dtype=torch.int64, device=device)
            batch_size = int(dist.all_reduce_sum(mine))
        logger.info("batch_size=%r: chose %d — %s", options.batch_size, batch_size, choice.reason)
        if options.batch_size == "adaptive":
            adaptive = AdaptiveBatch(start=batch_size, max_batch=choice.largest, noise_scale=choice.b_simple)
    else:
        assert isinstance(options.batch_size, int)
        batch_size = options.batch_size
        if options.drop_last and batch_size > len(src):
            raise expected("batch_size", f"at most the number of samples ({len(src)}) when drop_last=True",
                           batch_size)
    micro = options.micro_batch_size
    if "auto" in (micro, options.micro_batch_tokens) and device.type == "cuda" and is_sharded(module):
        raise InputError("micro_batch_size='auto'/micro_batch_tokens='auto' with strategy='fsdp' are measured on the "
                         "CPU only: on CUDA the search runs trials until one runs out of memory, and a rank that "
                         "does so inside a sharded step leaves the other ranks waiting in its collectives. Give "
                         "micro_batch_size (or micro_batch_tokens) as a number, or use strategy='ddp'")
    if micro == "auto":
        # Every rank measures (a sharded module: its sharded step); all agree on the size that fits on each.
        fits = find_micro_batch_size(module, loss_fn, src, device=device, optimizer=optimizer, max_size=batch_size,
                                     precision=options.precision, ranks=dist)
        logger.info("micro_batch_size='auto': %d fits in memory (batch_size stays %d)", fits, batch_size)
        micro = fits
    if isinstance(micro, int) and micro >= batch_size:
        micro = None
    assert micro is None or isinstance(micro, int)
    tokens = options.micro_batch_tokens
    if tokens == "auto":
        rows = -(-batch_size // dist.world_size) if micro is None else micro
        tokens = find_micro_batch_tokens(module, loss_fn, src, device=device, optimizer=optimizer, max_rows=rows,
                                         precision=options.precision, ranks=dist)
        logger.info("micro_batch_tokens='auto': %d tokens fit in memory", tokens)
    assert tokens is None or isinstance(tokens, int)
    return BatchPlan(batch_size, micro, adaptive, choice, tokens)
