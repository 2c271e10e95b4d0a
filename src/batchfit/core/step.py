"""THE training step, in the order of the algorithm; the trainer and every probe run this one.

:meth:`Step.step` is the whole order in one function: for each micro-batch, forward (under the
run's precision) and the loss weighted by the micro-batch's share of the whole batch — of its
samples, or of its tokens when ``loss_count`` counts them — so that the gradient is that of the
mean over the batch, never a mean of micro-batch means; backward, with the gradients summed across
ranks only on the last micro-batch (by DDP, or afterwards by the ``reduce_grads`` passed in); the
non-finite check; then unscale, clip, step and zero the gradients (or drop them).

Everything a caller learns from a step comes back in its :class:`StepResult`; everything it
wants done inside one goes in as an argument.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import optimizer as _optimizers

from ..errors import InputError
from .batch import Batch, LossFn, batch_len, forward_loss, has_token_labels, micro_batches, token_count
from .grads import squared_grad_norm
from .precision import autocast

# Called just before the last backward (whose gradient all-reduce syncs the ranks) with this
# rank's loss share and its noise sample, so that a small all-reduce of the caller's own can
# travel while the backward computes; what it returns (a zero-valued term, or None) is added to
# that backward's loss, so that numbers can ride in DDP's gradient all-reduce as a gradient.
BeforeLastBackward = Callable[[torch.Tensor, "NoiseSample | None"], "torch.Tensor | None"]
# Sums the gradients of ``params`` over ranks, as the mean DDP would give, in place (a rank without a
# sample in the step counts as zeros), together with ``numbers`` (this rank's loss share first), in one
# collective; returns the sums of ``numbers``. For runs that cannot use DDP (a stream's ranks).
ReduceGrads = Callable[[list[torch.nn.Parameter], list[float]], list[float]]


@dataclass(frozen=True)
class NoiseSample:
    """``|G_small|²`` of a step's first micro-batch (``b_small`` samples), before any sync between ranks.

    With the squared norm of the whole batch's gradient (:meth:`Step.grad_sq`) it is one
    measurement of the gradient noise scale (McCandlish et al. 2018, Appendix A).
    """

    small_sq: float
    b_small: float


@dataclass
class StepResult:
    """What one step gave.

    ``loss`` is this rank's share of the batch's mean loss (detached; the shares of all ranks sum
    to the mean loss of the whole batch) after :meth:`Step.accumulate`, and the whole batch's mean
    loss after :meth:`Step.step` when the ranks' losses were summed; ``noise`` the noise sample when
    one was asked for. :meth:`Step.step` also fills in ``value`` (the loss read back, when it was
    checked), ``grad_sq`` (the squared norm of the batch's gradient, with a noise sample),
    ``numbers`` (the sums over ranks that rode with ``reduce_grads``), ``stop`` (the ranks agreed to
    stop before this update) and ``applied`` (whether the weights were updated).
    """

    loss: torch.Tensor | float
    noise: NoiseSample | None = None
    value: float | None = None
    grad_sq: float | None = None
    numbers: list[float] | None = None
    stop: bool = False
    applied: bool = False
    empty: bool = False  # nothing to train on (every event of a stream batch was quarantined): no step


def _bare_step(optimizer: torch.optim.Optimizer | None) -> Callable[[torch.optim.Optimizer], Any] | None:
    """The optimizer class's own ``step``, unwrapped from PyTorch's per-call profiler range and hook loop, when
    its ``zero_grad`` is PyTorch's and nothing patched ``step`` on the instance (an lr scheduler counting calls
    does); ``None`` otherwise. Those two ranges cost some 25 µs a step on a small CPU model, a tenth of a hand
    loop's step; :func:`_step_observed` sends each step back to the wrapped calls while anything listens."""
    if optimizer is None or type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        return None
    wrapped = type(optimizer).step
    bare = getattr(wrapped, "__wrapped__", None)
    if not getattr(wrapped, "hooked", False) or not callable(bare) or "step" in vars(optimizer):
        return None
    return bare


def _step_observed(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a profiler runs or a step hook is registered (on ``optimizer`` or for all): then the step goes
    through ``optimizer.step()`` and ``zero_grad`` so that they see it."""
    # Each looked up with a default that counts as observed: a PyTorch without one of them takes the stock path.
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", True)
                or getattr(optimizer, "_optimizer_step_pre_hooks", True)
                or getattr(optimizer, "_optimizer_step_post_hooks", True)
                or getattr(_optimizers, "_global_optimizer_pre_hooks", True)
                or getattr(_optimizers, "_global_optimizer_post_hooks", True) or "step" in vars(optimizer))


def whole_batch(loss_fn: Any) -> str | None:
    """The name of ``loss_fn`` when it declares ``whole_batch = True`` (a loss that scores a batch as a whole and
    in order, such as :class:`~batchfit.streams.SequentialMSE`, which cannot be split into micro-batches or
    ranks), else ``None``."""
    return type(loss_fn).__name__ if getattr(loss_fn, "whole_batch", False) is True else None


class Step:
    """Runs steps for one model/optimizer pair with a fixed precision and micro-batch size.

    ``model`` is what is called (a DDP wrapper in a distributed run); ``world_size`` scales the
    loss because DDP averages gradients over ranks while batchfit wants the mean over all samples
    of the batch. ``micro_batch_tokens`` cuts micro-batches by padded tokens instead (see
    :func:`~batchfit.core.batch.micro_batches`).

    The loss is a mean over samples unless it is a mean over tokens: when ``loss_count(micro_batch)``
    (optional) counts its terms, or, without it, when a dict batch has per-token ``labels`` and the
    model computes its own loss (:func:`~batchfit.core.batch.token_count`). Then each micro-batch
    weighs by its share of the tokens of the whole batch, over all ranks. ``sum_over_ranks(t)``
    starts summing ``t`` over ranks and returns a function that waits for the sum: the token total
    travels while the forward passes compute and the gradients are rescaled once it is known, so no
    collective waits on the critical path. ``reduce_grads`` (:data:`ReduceGrads`) sums the gradients
    over ranks after the backward passes, for a ``model`` that is not wrapped in DDP. Without an
    ``optimizer`` a step only computes gradients (of the model's trainable parameters).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None, optimizer: torch.optim.Optimizer | None,
                 *, device: torch.device, precision: str = "fp32", micro_batch_size: int | None = None,
                 micro_batch_tokens: int | None = None, max_grad_norm: float | None = None, world_size: int = 1,
                 loss_count: Callable[[Batch], Any] | None = None,
                 sum_over_ranks: Callable[[torch.Tensor], Callable[[], torch.Tensor]] | None = None,
                 reduce_grads: ReduceGrads | None = None) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.whole_batch = whole = whole_batch(loss_fn)
        if whole and (micro_batch_size is not None or micro_batch_tokens is not None or world_size > 1):
            how = ("micro_batch_size" if micro_batch_size is not None else
                   "micro_batch_tokens" if micro_batch_tokens is not None else f"{world_size} processes")
            raise InputError(f"the loss {whole} scores each batch as a whole, in order; {how} would split the "
                             f"batch and score each piece as if it were the batch: train it on one process "
                             f"without micro-batches")
        self.device, self.precision = device, precision
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.loss_count = loss_count
        self.sum_over_ranks = sum_over_ranks
        self.reduce_grads = reduce_grads
        if optimizer is not None:
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.bare_step = _bare_step(optimizer)
        # The common case (one process, one micro-batch of samples, fp32, no clipping, an optimizer): what
        # :meth:`step` can run as a hand-written loop would, when its call asks for nothing more.
        self.plain = (world_size == 1 and micro_batch_size is None and micro_batch_tokens is None
                      and loss_count is None and sum_over_ranks is None and precision == "fp32"
                      and max_grad_norm is None and optimizer is not None)

    def step(self, batch: Batch | None, global_size: int, *, check_finite: bool = True, measure_noise: bool = False,
             before_last_backward: BeforeLastBackward | None = None,
             after_sync: Callable[[StepResult], StepResult] | None = None,
             numbers: Sequence[float] = ()) -> StepResult:
        """One whole step on this rank's part of a batch of ``global_size`` samples, in the algorithm's order.

        ``batch`` is ``None`` on a rank that holds no sample of the step (with ``reduce_grads``).
        ``after_sync`` (distributed) receives the result once the ranks' gradients are summed and
        returns it with what the ranks agreed on (their mean loss, noise sample, a stop); ``numbers``
        ride with ``reduce_grads``. With ``check_finite`` the loss is read back and a NaN or
        infinite one drops the gradients instead of updating (the caller decides what follows).
        """
        if (self.plain and type(batch) is tuple and self.reduce_grads is None and after_sync is None and check_finite
                and not measure_noise and before_last_backward is None and self.loss_fn is not None):
            return self._plain_step(batch)
        # Forward, loss and backward of each micro-batch; DDP sums the gradients over ranks in the last backward.
        if batch is not None:
            result = self.accumulate(batch, global_size, measure_noise=measure_noise,
                                     before_last_backward=before_last_backward)
        else:
            result = StepResult(0.0)
        # The explicit sum over ranks, for a model without DDP; the loss shares ride with the gradients.
        if self.reduce_grads is not None:
            totals = self.reduce_grads(self.params, [float(result.loss), *numbers])
            result.loss, result.numbers = totals[0], totals[1:]
        if after_sync is not None:
            result = after_sync(result)
            if result.stop:
                self.skip()
                return result
        # The non-finite check: a NaN or infinite loss never reaches the weights.
        if check_finite:
            result.value = value = float(result.loss)
            if not math.isfinite(value):
                self.skip()
                return result
        if result.noise is not None:
            result.grad_sq = self.grad_sq()  # of the whole batch, for the noise scale
        optimizer, scaler = self.optimizer, self.scaler
        if optimizer is not None:
            if self.max_grad_norm is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skips the update when the scaled gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)  # zero, for the next step
            else:
                self._update(optimizer)
            result.applied = True
        else:
            self.model.zero_grad(set_to_none=True)
        return result

    def _plain_step(self, batch: tuple[Any, ...]) -> StepResult:
        """:meth:`step` of the common case (see :attr:`plain`): the same operations in the same order, without
        the branches that do not apply."""
        loss, _ = forward_loss(self.model, self.loss_fn, batch)
        loss.backward()
        loss = loss.detach()
        value = float(loss)  # the non-finite check: a NaN or infinite loss never reaches the weights
        if not math.isfinite(value):
            self.skip()
            return StepResult(loss, value=value)
        assert self.optimizer is not None
        self._update(self.optimizer)
        return StepResult(loss, value=value, applied=True)

    def _update(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` then ``optimizer.zero_grad(set_to_none=True)``; without PyTorch's profiler ranges
        around them while nothing observes them (see :func:`_bare_step`)."""
        bare = self.bare_step
        if bare is None or _step_observed(optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        bare(optimizer)
        for group in optimizer.param_groups:  # Optimizer.zero_grad(set_to_none=True)
            for param in group["params"]:
                param.grad = None

    def counter(self, batch: Batch) -> Callable[[Batch], Any] | None:
        """What counts the loss terms of ``batch``'s pieces: ``loss_count``, tokens of per-token labels
        averaged by the model's own loss, or ``None`` (samples)."""
        if self.loss_count is not None:
            return self.loss_count
        if self.loss_fn is None and has_token_labels(batch):
            return lambda piece: token_count(self.model, piece)
        return None

    def accumulate(self, batch: Batch, global_size: int, *, measure_noise: bool = False,
                   before_last_backward: BeforeLastBackward | None = None) -> StepResult:
        """Forward and backward over every micro-batch of ``batch``, this rank's share of ``global_size`` samples.

        ``measure_noise`` records ``|G_small|²`` of the first micro-batch (a batch that is one
        micro-batch is halved for it; the gradient is the same).
        """
        counter = self.counter(batch)
        if counter is None and self.world_size == 1 and self.micro_batch_size is None \
                and self.micro_batch_tokens is None and not measure_noise and before_last_backward is None:
            # The common case, kept as short as a hand-written loop.
            with autocast(self.precision, self.device.type):
                loss, _ = forward_loss(self.model, self.loss_fn, batch)
            self._backward(loss)  # one process, one micro-batch: the batch is the whole global batch
            return StepResult(loss.detach())
        if counter is None and self.micro_batch_size is None and self.micro_batch_tokens is None \
                and not measure_noise:
            return self._one_piece(batch, global_size, before_last_backward)
        pieces = list(micro_batches(batch, self.micro_batch_size, self.micro_batch_tokens))
        if measure_noise and len(pieces) == 1 and batch_len(batch) >= 2:
            if self.whole_batch:
                raise InputError(f"the loss {self.whole_batch} scores each batch as a whole: the noise "
                                 f"scale, measured from a batch's two halves (batch_size='auto' or 'adaptive', "
                                 f"max_batch_size='auto'), would change its update; give a batch size")
            pieces = list(micro_batches(batch, -(-batch_len(batch) // 2)))
        counts, scale, total_later = self._counts(pieces, counter, global_size)
        noise = None
        share: torch.Tensor | None = None
        correction: Any = None
        for index, ((micro, _), count) in enumerate(zip(pieces, counts)):
            last = index == len(pieces) - 1
            with _gradient_sync(self.model, last):
                with autocast(self.precision, self.device.type):
                    loss, _ = forward_loss(self.model, self.loss_fn, micro)
                weight = count * scale
                # A rank's share of a batch smaller than the world is empty: its loss is NaN (a mean over
                # nothing) but it still runs backward so that DDP's gradient sync happens on every rank.
                part = _share(loss.detach(), weight, count)
                share = part if share is None else share + part
                if last and total_later is not None:
                    correction = global_size / total_later()  # long arrived: it was sent before the first forward
                    share = share * correction.to(share.device)
                scaled = loss * (weight * self.world_size)
                if last and before_last_backward is not None:
                    scaled = _plus(scaled, before_last_backward(share, noise))
                self._backward(scaled)
                if measure_noise and index == 0 and len(pieces) > 1:
                    # The accumulated gradient is still the first micro-batch's alone (and local).
                    noise = NoiseSample(self.grad_sq() / float(weight * self.world_size) ** 2, pieces[0][1])
        if correction is not None:
            self._rescale(correction)
        assert share is not None
        return StepResult(share, noise)

    def _one_piece(self, batch: Batch, global_size: int, before_last_backward: BeforeLastBackward | None) -> StepResult:
        """The loop of :meth:`accumulate` for a batch that is one micro-batch of samples, without its generality
        (the same operations in the same order, so the same numbers)."""
        size = batch_len(batch)
        weight = size * (1.0 / global_size)
        with _gradient_sync(self.model, True):
            with autocast(self.precision, self.device.type):
                loss, _ = forward_loss(self.model, self.loss_fn, batch)
            share = _share(loss.detach(), weight, size)
            factor = weight * self.world_size
            scaled = loss if factor == 1.0 else loss * factor  # an even share of the ranks': x * 1.0 is x
            if before_last_backward is not None:
                scaled = _plus(scaled, before_last_backward(share, None))
            self._backward(scaled)
        return StepResult(share)

    def _counts(self, pieces: list[tuple[Batch, int]], counter: Callable[[Batch], Any] | None,
                global_size: int) -> tuple[list[Any], Any, Callable[[], torch.Tensor] | None]:
        """Each micro-batch's count of loss terms, the factor that turns a count into its weight, and
        (across ranks) a function waiting for the total count over ranks.

        Counts of loss terms are integers, kept as float64 tensors (exact up to 2**53) where the
        counter put them, so each weight ``count / total`` is the exact ratio rounded once,
        whatever the model's dtype (a float32 ratio is off by 1e-8 relative), and no count is read
        back from the device. Across ranks the total is not known before the backward passes:
        they weigh by ``count / global_size``, the same factor on every rank, and the gradients
        are multiplied by ``global_size / total`` once the total arrives.
        """
        if counter is None:
            return [size for _, size in pieces], 1.0 / global_size, None
        exact = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        counts = [torch.as_tensor(counter(micro), dtype=exact) for micro, _ in pieces]
        local = torch.stack([count.to(counts[0].device) for count in counts]).sum()
        if self.sum_over_ranks is not None and self.world_size > 1:
            return counts, 1.0 / global_size, self.sum_over_ranks(local.to(self.params[0].device))
        return counts, 1.0 / local, None

    def _rescale(self, factor: torch.Tensor) -> None:
        """Multiply every accumulated gradient by ``factor`` (the step's deferred normalisation)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            torch._foreach_mul_(same, factor.to(device=same[0].device, dtype=dtype))

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def grad_scale(self) -> float:
        """The factor the gradients carry: the fp16 loss scale, else 1."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def grad_sq(self) -> float:
        """Squared norm of the gradients accumulated so far, unscaled (one device sync)."""
        return squared_grad_norm(p.grad for p in self.params) / self.grad_scale() ** 2

    def skip(self) -> None:
        """Drop the accumulated gradients without updating."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    def run(self, batch: Batch) -> torch.Tensor:
        """One whole step on ``batch`` (no check of the loss); its mean loss."""
        loss = self.step(batch, batch_len(batch), check_finite=False).loss
        assert isinstance(loss, torch.Tensor)
        return loss


def _gradient_sync(model: torch.nn.Module, sync: bool) -> Any:
    """The context of a backward that sums the gradients over ranks only when ``sync``: DDP's ``no_sync``,
    or FSDP2's ``set_requires_gradient_sync`` (which stays set: it is set before every backward)."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_sync is not None:
        set_sync(sync)
        return contextlib.nullcontext()
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if not sync and no_sync is not None else contextlib.nullcontext()


def _share(loss: torch.Tensor, weight: Any, count: Any) -> torch.Tensor:
    """``loss * weight``, or zero for a micro-batch without loss terms (its mean loss is NaN).

    A count that is a tensor is compared where it lives: reading it back would wait for the device.
    """
    if isinstance(count, torch.Tensor):
        return torch.where(count.to(loss.device) > 0, loss * weight, 0.0)
    return loss * weight if count else torch.zeros_like(loss)


def _plus(loss: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    """``loss + term`` for a backward (``term`` is zero-valued: the loss and the model's gradients stay the same)."""
    return loss if term is None else loss + term.to(loss.dtype)
