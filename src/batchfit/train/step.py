"""One training step, in the order of the algorithm.

For each micro-batch: forward, loss weighted by the micro-batch's share of the whole batch
(so the gradient is that of the mean over the batch, never a mean of micro-batch means),
backward — with gradient sync across ranks only on the last micro-batch. Then the caller
checks the loss, and :meth:`StepRunner.update` unscales, clips, steps and zeroes the grads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..data.sources import Batch
from ..tune.noise import squared_grad_norm
from .batch import LossFn, batch_len, forward_loss, micro_batches
from .settings import AUTOCAST_DTYPES

_NO_CONTEXT = contextlib.nullcontext()


class StepRunner:
    """Runs steps for one model/optimizer pair with a fixed precision and micro-batch size.

    ``model`` is what is called (a DDP wrapper in a distributed run); ``world_size`` scales
    the loss because DDP averages gradients over ranks while batchfit wants the mean over
    all samples of the batch. ``loss_count(micro_batch)`` (optional) counts loss terms, e.g.
    tokens, when the loss is a mean over tokens rather than samples.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer,
                 micro_batch_size: int | None, device: torch.device, precision: str,
                 max_grad_norm: float | None, world_size: int = 1,
                 loss_count: Callable[[Batch], Any] | None = None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.loss_count = loss_count
        self.all_reduce = all_reduce
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        dtype = AUTOCAST_DTYPES.get(precision)
        self.autocast_dtype, self.device_type = dtype, device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        # Gradient noise measurement (McCandlish et al. 2018): when on, each step records the
        # squared norm of its first micro-batch's gradient (before any cross-rank sync) and of
        # the whole batch's gradient, at no cost beyond two norms.
        self.measure_noise = False
        self.noise_pair: tuple[float, float, int, int] | None = None  # (small², big², b_small, b_big)
        # Distributed: called just before the last backward, whose gradient all-reduce syncs the
        # ranks, with this rank's loss share and (small², b_small) or None, so that the caller can
        # start its own small all-reduce and let it overlap the backward.
        self.before_sync: Callable[[torch.Tensor, tuple[float, int] | None], None] | None = None

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return _NO_CONTEXT
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def accumulate(self, batch: Batch, global_size: int) -> torch.Tensor:
        """Forward and backward over every micro-batch; returns this rank's share of the batch loss.

        The shares of all ranks sum to the mean loss of the whole batch.
        """
        if self.loss_count is None and self.world_size == 1 and self.micro_batch_size is None \
                and not self.measure_noise:
            # The common case, kept as short as a hand-written loop.
            with self._autocast():
                loss, _ = forward_loss(self.model, self.loss_fn, batch)
            self._backward(loss)  # one process, one micro-batch: the batch is the whole global batch
            return loss.detach()
        pieces = list(micro_batches(batch, self.micro_batch_size))
        if self.measure_noise and len(pieces) == 1 and batch_len(batch) >= 2:
            # Two halves give the same gradient and a smaller batch to measure the noise with.
            pieces = list(micro_batches(batch, -(-batch_len(batch) // 2)))
        counts, total = self._counts(pieces, global_size)
        small_sq = None
        share = None
        for index, ((micro, _), count) in enumerate(zip(pieces, counts)):
            last = index == len(pieces) - 1
            sync = _NO_CONTEXT if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, _ = forward_loss(self.model, self.loss_fn, micro)
                weight = count / total
                # A rank's share of a batch smaller than the world is empty: its loss is NaN (a mean over
                # nothing) but it still runs backward so that DDP's gradient sync happens on every rank.
                part = loss.detach() * weight if count else torch.zeros_like(loss.detach())
                share = part if share is None else share + part
                if last and self.before_sync is not None:
                    self.before_sync(share, None if small_sq is None else (small_sq, pieces[0][1]))
                self._backward(loss * (weight * self.world_size))
                if self.measure_noise and index == 0 and len(pieces) > 1:
                    # The accumulated gradient is still the first micro-batch's alone (and local).
                    small_sq = squared_grad_norm(p.grad for p in self.params) / (weight * self.world_size) ** 2
        assert share is not None
        if small_sq is not None:
            self.noise_pair = (small_sq, squared_grad_norm(p.grad for p in self.params), pieces[0][1], global_size)
        return share

    def _counts(self, pieces: list[tuple[Batch, int]], global_size: int) -> tuple[list[Any], Any]:
        if self.loss_count is None:
            return [size for _, size in pieces], global_size
        counts = [self.loss_count(micro) for micro, _ in pieces]
        total = torch.as_tensor(sum(counts), dtype=torch.float64)
        if self.all_reduce is not None and self.world_size > 1:
            total = self.all_reduce(total.to(self.params[0].device)).cpu()
        return counts, float(total)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def update(self) -> torch.Tensor | None:
        """Unscale, clip (returns the gradient norm when clipping), step, zero the grads."""
        norm = None
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.skip()
        return norm

    def skip(self) -> None:
        """Drop the accumulated gradients without updating."""
        self.optimizer.zero_grad(set_to_none=True)
