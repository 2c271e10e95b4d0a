"""Where the data meets the model and the loss: checked once, on two samples, before the first step.

One forward pass (eval mode, so that no running statistic moves; the random state restored
after) compares the model's output with the target as the loss sees it:

- an element-wise loss (``mse``, ``l1``, ``smooth_l1``, ``huber``, ``bce``) given an output of
  shape ``(N, 1)`` and a target of shape ``(N,)`` (or the other way round, or any two shapes of
  the same size per sample) would broadcast them to ``(N, N)`` and learn nothing; batchfit
  reshapes the target to the output's shape, as Keras does, and says so once. Shapes of another
  size are refused, naming both and the fix;
- cross-entropy given class indices of shape ``(N, 1)`` takes them as ``(N,)``; an output of one
  column (a single class) or targets of another shape are refused;
- a forward pass that fails because the data's feature width (or channels) is not the model's
  first layer's is refused naming both;
- a model output the loss cannot take (a tuple), and a loss without a gradient, are refused.

Nothing here runs per step: the adapted loss is a small wrapper (a reshape, a view) chosen once.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.batch import Batch, LossFn, forward, param_dtype, to_device
from ..core.precision import autocast
from ..core.rng import rng_state, set_rng_state
from ..data.sources import Source, source_lengths
from ..errors import BatchfitError, InputError

logger = logging.getLogger("batchfit")

ELEMENTWISE_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy_with_logits,
                         F.binary_cross_entropy)
ELEMENTWISE_MODULES = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss, torch.nn.HuberLoss,
                       torch.nn.BCEWithLogitsLoss, torch.nn.BCELoss)
CLASS_FUNCTIONS = (F.cross_entropy, F.nll_loss)
CLASS_MODULES = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)
CHECK_SAMPLES = 2


def loss_kind(loss_fn: Any) -> str | None:
    """``"elementwise"``, ``"classes"`` (class-index targets) or ``None`` (a loss of the user's own)."""
    if any(loss_fn is f for f in ELEMENTWISE_FUNCTIONS) or isinstance(loss_fn, ELEMENTWISE_MODULES):
        return "elementwise"
    if any(loss_fn is f for f in CLASS_FUNCTIONS) or isinstance(loss_fn, CLASS_MODULES):
        return "classes"
    return None


def loss_name(loss_fn: Any) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


class AdaptedLoss:
    """``loss_fn`` with its target reshaped to what it needs (the output's shape, or flat class
    indices), and integer targets of an element-wise loss made floats: chosen once, a view a step."""

    def __init__(self, loss_fn: LossFn, flatten: bool, cast: bool) -> None:
        self.loss_fn, self.flatten, self.cast = loss_fn, flatten, cast
        self.__name__ = loss_name(loss_fn)

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.reshape(target.shape[0]) if self.flatten else target.reshape(output.shape)
        if self.cast:
            target = target.to(output.dtype)
        return self.loss_fn(output, target)


def shapes(batch: Batch) -> str:
    """``x (5,) float32, y () int64`` — a batch's per-sample shapes and dtypes, for messages."""
    items = batch.items() if isinstance(batch, dict) else (
        (("x" if i < len(batch) - 1 or len(batch) == 1 else "y") + (str(i) if len(batch) > 2 and i < len(batch) - 1
                                                                     else ""), t) for i, t in enumerate(batch))
    return ", ".join(f"{name} {tuple(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}" for name, t in items
                     if isinstance(t, torch.Tensor))


def check_lengths(model: torch.nn.Module, src: Source) -> None:
    """Refuse samples longer than the model's positions (``config.max_position_embeddings`` of a Hugging Face
    model) before training, naming the longest: they would fail mid-run with a raw size error."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return
    lengths = source_lengths(src)
    if lengths is None or not len(lengths):
        return
    longest = int(np.argmax(lengths))
    if int(lengths[longest]) > limit:
        raise InputError(f"sample {longest} has {int(lengths[longest]):,} tokens, but the model takes at most "
                            f"{limit:,} (its config.max_position_embeddings): write the shards with --max-length "
                            f"{limit} (max_length={limit}) or less")


def batch_dependent(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose output in train mode depends on the other samples of the batch
    (BatchNorm and its kin: they normalise by the batch's statistics)."""
    return [f"{name} ({type(module).__name__})" if name else type(module).__name__
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.batchnorm._LazyNormBase))
            or type(module).__name__ in ("GhostBatchNorm", "SyncBatchNorm")]


def summary(model: torch.nn.Module, optimizer: Any, src: Source, described: str, batch_size: int,
            micro_batch_size: int | None, steps: int, device: torch.device) -> str:
    """The run at a glance (printed once at its start when the progress bar is on)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = getattr(optimizer, "param_groups", [{}])
    lr = groups[0].get("lr") if groups else None
    micro = f" in micro-batches of {micro_batch_size}" if micro_batch_size else ""
    return (f"model {type(model).__name__}: {total:,} parameters ({trainable:,} trainable) on {device}\n"
            f"data: {len(src):,} samples of {described or 'unknown shape'}\n"
            f"plan: batch_size {batch_size}{micro}, {steps:,} steps an epoch, {type(optimizer).__name__} lr {lr}")


def check_first_batch(model: torch.nn.Module, loss_fn: LossFn | None, src: Source,
                      transform: Callable[[Batch], Batch] | None, device: torch.device,
                      tell: Callable[[str], None], precision: str = "fp32") -> tuple[LossFn | None, str]:
    """The loss to train with — ``loss_fn``, or it adapted to the data's targets (told through ``tell``) —
    and the shapes and dtypes of a sample batch (for the run's summary; ``""`` when none was gathered).

    Raises :class:`~batchfit.BatchfitError` naming the shapes when output, target and loss
    do not fit. Tuple batches with a ``loss_fn`` only: dict batches (a model computing its own
    loss) are the model's business. The forward runs in ``precision``, as training will.
    """
    if len(src) == 0 or isinstance(loss_fn, AdaptedLoss):
        return loss_fn, ""
    state = rng_state()
    was_training = model.training
    try:
        batch = src.gather(np.arange(min(CHECK_SAMPLES, len(src)), dtype=np.int64))
        if transform is not None:
            batch = transform(batch)
        described = shapes(batch)
        if loss_fn is None or isinstance(batch, dict) or len(batch) < 2:
            return loss_fn, described
        batch = to_device(batch, device, param_dtype(model))
        model.eval()
        try:
            with autocast(precision, device.type):
                output = forward(model, batch)
        except (RuntimeError, ValueError, IndexError) as error:
            if isinstance(error, BatchfitError):
                raise
            explained = explain_forward_error(model, batch, error)
            if explained is None:
                return loss_fn, described  # not the data against the model: the first step raises it, naming the step
            raise explained from error
        assert isinstance(batch, tuple)
        return _check_output(model, loss_fn, output, batch, tell), described
    finally:
        model.train(was_training)
        set_rng_state(state)


def _check_output(model: torch.nn.Module, loss_fn: LossFn, output: Any, batch: tuple[torch.Tensor, ...],
                  tell: Callable[[str], None]) -> LossFn:
    target = batch[-1]
    if not isinstance(output, torch.Tensor):
        try:
            loss_fn(output, target)
        except Exception as error:  # noqa: BLE001 - any failure: the loss cannot take this output
            returned = type(output).__name__
            parts = ""
            if isinstance(output, (tuple, list)):
                parts = " of " + ", ".join(f"{tuple(o.shape)}" if isinstance(o, torch.Tensor) else type(o).__name__
                                           for o in output)
            raise InputError(
                f"the model returns a {returned}{parts}, which `loss_fn` ({loss_name(loss_fn)}) cannot take "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}). "
                f"Return one tensor from forward(), or pass a loss that picks the output, e.g. "
                f"loss_fn=lambda out, y: F.cross_entropy(out[0], y)") from error
        return loss_fn
    kind: str | None = loss_kind(loss_fn)
    adapted: LossFn = loss_fn
    if kind == "classes":
        adapted = _classes(loss_fn, output, target, tell)
    elif kind == "elementwise" or kind is None:
        adapted = _elementwise(loss_fn, output, target, tell, known=kind is not None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = adapted(output, target)
    except Exception:  # noqa: BLE001 - a failure of the loss itself: the first step raises it, naming the step
        return adapted
    trainable = any(p.requires_grad for p in model.parameters())
    if isinstance(loss, torch.Tensor) and loss.dim() == 0 and trainable and not loss.requires_grad \
            and torch.is_grad_enabled():
        raise InputError(f"the loss has no gradient: `loss_fn` ({loss_name(loss_fn)}) returned a tensor that "
                            f"does not depend on the model's output (a .item(), .detach(), torch.tensor(...) or "
                            f"NumPy round trip inside it?). Compute the loss with torch operations on the output")
    return adapted


def _same_size(output: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether output and target hold as many values per sample (of the same sample count)."""
    if output.dim() == 0 or target.dim() == 0 or output.shape[0] != target.shape[0] or not len(output):
        return False
    return output[0].numel() == target[0].numel()


def _elementwise(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor, tell: Callable[[str], None],
                 known: bool) -> LossFn:
    """An element-wise loss (or one of the user's that warns like one): the target made the output's shape."""
    cast = known and not target.is_floating_point() and output.is_floating_point()
    if not known:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loss_fn(output, target)
                failed = False
            except Exception:  # noqa: BLE001 - the first step raises it, naming the step
                failed = True
        warned = any("target size" in str(w.message) and "input size" in str(w.message) for w in caught)
        if failed and not warned:
            return loss_fn
        if not warned:
            if output.is_floating_point() and target.is_floating_point() and output.dim() <= 2 \
                    and target.dim() <= 2 and tuple(output.shape) != tuple(target.shape) and _same_size(output, target):
                logger.warning("the model's output has shape %s and the targets %s: if `loss_fn` (%s) subtracts "
                               "them they broadcast to (N, N); reshape one to the other inside it",
                               tuple(output.shape), tuple(target.shape), loss_name(loss_fn))
            return loss_fn  # a loss of the user's own that takes these shapes as they are
    if tuple(output.shape) == tuple(target.shape):
        return AdaptedLoss(loss_fn, False, True) if cast else loss_fn
    name = loss_name(loss_fn)
    if not _same_size(output, target):
        raise InputError(
            f"`loss_fn` ({name}) compares the model's output of shape {tuple(output.shape)} with targets of shape "
            f"{tuple(target.shape)}: they differ in size per sample ({output[0].numel() if len(output) else 0} "
            f"against {target[0].numel() if len(target) else 0}) and would broadcast into nonsense. Make the "
            f"model output one value per target value (e.g. out_features={target[0].numel() if len(target) else 1}),"
            f" or give targets of shape (N, {', '.join(str(d) for d in output.shape[1:])})")
    tell(f"targets of shape (N, {', '.join(str(d) for d in target.shape[1:])}) taken as the output's shape "
         f"(N, {', '.join(str(d) for d in output.shape[1:])}) for {name} (else they would broadcast)")
    return AdaptedLoss(loss_fn, False, cast)


def _classes(loss_fn: LossFn, output: torch.Tensor, target: torch.Tensor, tell: Callable[[str], None]) -> LossFn:
    """Cross-entropy: class indices of shape (N, 1) flattened; one output column or other shapes refused."""
    name = loss_name(loss_fn)
    if output.dim() == 2 and output.shape[1] == 1:
        regression = " For real-valued targets (regression) use mse (loss.name = \"mse\")." \
            if target.is_floating_point() else ""
        raise InputError(
            f"`loss_fn` ({name}) needs one output per class, but the model outputs shape {tuple(output.shape)}: "
            f"one class, whose cross-entropy is always 0. Give the model as many outputs as classes "
            f"(out_features = the number of classes), or for a yes/no "
            f"target use binary_cross_entropy_with_logits (bce_with_logits) with float targets.{regression}")
    if target.is_floating_point():
        return loss_fn  # class probabilities, or float labels (told at the first step)
    if output.dim() == 2 and target.dim() == 2 and target.shape[1] == 1:
        tell(f"class indices of shape (N, 1) taken as (N,) for {name}")
        return AdaptedLoss(loss_fn, True, False)
    if output.dim() == target.dim() + 1 and output.shape[0] == target.shape[0] \
            and tuple(output.shape[2:]) == tuple(target.shape[1:]):
        return loss_fn
    raise InputError(
        f"`loss_fn` ({name}) needs one class index per sample: targets of shape (N,) with an output of shape "
        f"(N, classes). Received: output {tuple(output.shape)}, targets {tuple(target.shape)} "
        f"({str(target.dtype).removeprefix('torch.')}). Give y of shape (N,) holding class indices")


def first_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The first module with weights: a Linear, Conv or Embedding (what the data meets first)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.Embedding)):
            return module
    return None


def explain_forward_error(model: torch.nn.Module, batch: Batch, error: BaseException,
                          targets: bool = True) -> BatchfitError | None:
    """A forward failure that is the data's width (or channels) against the model's first layer, told in
    words; ``None`` when it is something else."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(batch, dict):
        inputs = list(batch.values())
    else:
        inputs = list(batch[:-1] if len(batch) > 1 and targets else batch)
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        return None
    x = inputs[0]
    layer = first_layer(model)
    sample = tuple(x.shape[1:])
    features = int(np.prod(sample)) if sample else 1
    if isinstance(layer, torch.nn.Linear) and "mat1 and mat2" in text:
        width = x.shape[-1] if x.dim() >= 2 else 1
        if layer.in_features in (width, features):
            return None  # the data fits the first layer: the mismatch is inside the model
        return InputError(
            f"the data does not fit the model: its samples have shape {sample} ({features} features), but the "
            f"model's first layer {layer} takes {layer.in_features}. Build the model with "
            f"in_features={features if x.dim() > 2 else width}, or give data with {layer.in_features} features a "
            f"sample ({text})")
    if isinstance(layer, torch.nn.modules.conv._ConvNd) and re.search(r"channels", text):
        channels = x.shape[1] if x.dim() >= 2 else 1
        if channels == layer.in_channels:
            return None
        return InputError(
            f"the data does not fit the model: its samples have shape {sample} ({channels} channels first), but "
            f"the model's first layer {layer} takes {layer.in_channels} channels. Build the model with "
            f"in_channels={channels}, or give images of {layer.in_channels} channels ({text})")
    if isinstance(layer, torch.nn.Embedding) and "index out of range" in text:
        top = int(x.max()) if x.numel() and not x.is_floating_point() else None
        return InputError(
            f"the data does not fit the model: token ids go up to {top}, but the model's embedding {layer} has "
            f"{layer.num_embeddings} rows (ids 0 to {layer.num_embeddings - 1}). Were the shards written with "
            f"another tokenizer than the model's? ({text})")
    return None
