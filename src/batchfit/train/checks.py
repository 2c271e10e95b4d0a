"""The Trainer's argument checks and the translation of raw errors raised inside a step.

Everything a run could only discover deep inside it — an object argument of the wrong kind, an
optimizer over another model, labels of the wrong dtype — is checked before any work starts or
told in words (with the step) when it surfaces.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..errors import InputError, expected
from .callbacks import Callback
from .metrics import is_stateful
from .options import TrainerOptions, option_names


def error_at_step(error: BaseException, step: int, epoch: int) -> BaseException:
    """``error`` raised inside a step, told with the step: targets out of range become a batchfit error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"step {step} (epoch {epoch})"
    if isinstance(error, IndexError) and "out of bounds" in text:
        return InputError(f"{where}: {text} The targets must be class indices from 0 to "
                             f"the number of the model's outputs - 1: check the labels, or the model's output size")
    if isinstance(error, IndexError) and "index out of range in self" in text:
        return InputError(f"{where}: {text}: an embedding got an index past its table, most often token ids "
                             f"beyond the model's vocabulary. Write the shards with the model's own tokenizer "
                             f"(or give the model a larger vocabulary)")
    found = re.search(r"expected target dtype to be Long or Byte, but got (\w+)", text)
    if found:
        return InputError(f"{where}: the labels are {found.group(1).lower()}, but cross-entropy needs class "
                             f"indices (int64): pass y.astype('int64') (or use a loss for real-valued targets)")
    found = re.search(r"must have the same dtype, but got (Byte|Char|Short|Int|Long|Bool) and (\w+)", text)
    if found:
        return InputError(f"{where}: the inputs are integers ({found.group(1).lower()}) but the model computes "
                             f"in {found.group(2).lower()}: convert them, e.g. transform=bf.ToFloat() (uint8 "
                             f"images to floats in [0, 1]) or x.astype('float32')")
    found = re.search(r"got an unexpected keyword argument '(\w+)'", text)
    if isinstance(error, TypeError) and found:
        return InputError(f"{where}: the model takes no argument {found.group(1)!r}: dict batches are passed as "
                             f"model(**batch); pass the data as a tuple (inputs..., target) instead, or name the "
                             f"arrays after the model's forward() parameters")
    if isinstance(error, torch.cuda.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                         and "out of memory" in text.lower()):
        return InputError(f"{where}: the device ran out of memory ({text[:200]}). Split each batch into "
                          f"micro-batches that fit: micro_batch_size='auto' (micro_batch_tokens='auto' for text) "
                          f"measures the largest; batch_size, and so the training, stays as it is")
    add_note = getattr(error, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(f"batchfit: raised during step {step} (epoch {epoch})")
    return error


def check_objects(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_schedule: Any, callbacks: Any,
                   metrics: Any, loss_count: Any, transform: Any) -> None:
    """Refuse the Trainer's object arguments that would only fail at their first use, deep in a run."""
    if isinstance(callbacks, Callback) or isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise expected("callbacks", "a list of batchfit Callback objects (wrap a single one in a list)",
                       type(callbacks).__name__)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise expected("callbacks", "a sequence of batchfit Callback objects", type(cb).__name__)
    if metrics is not None and (not isinstance(metrics, dict) or not all(
            isinstance(k, str) and (callable(f) or is_stateful(f)) for k, f in metrics.items())):
        raise expected("metrics", "a dict of name -> f(output, target)", metrics)
    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if lr_schedule is not None and not callable(lr_schedule) and not isinstance(lr_schedule, schedulers):
        raise expected("lr_schedule", "a callable step -> factor, a torch lr scheduler, or None", lr_schedule)
    for name, value in (("loss_count", loss_count), ("transform", transform)):
        if value is not None and not callable(value):
            raise expected(name, "a callable or None", value)
    mine = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if held and not any(id(p) in mine for p in held):
        raise expected("optimizer", "an optimizer over the model's parameters "
                       "(e.g. torch.optim.SGD(model.parameters(), lr=0.1))", "one that holds none of them")
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr >= 0):
            raise expected("optimizer", "learning rates that are finite and not negative",
                           f"lr={lr} in parameter group {index}")


def options_from(options: TrainerOptions | None, values: dict[str, Any]) -> TrainerOptions:
    """The options object from ``options=`` or from keywords (not both), unknown names refused."""
    if options is not None:
        if not isinstance(options, TrainerOptions):
            raise expected("options", "a TrainerOptions", type(options).__name__)
        if values:
            raise InputError(f"Pass the Trainer's options either as `options=` or as keywords, not both. "
                                f"Received: options and {sorted(values)}")
        return options
    unknown = sorted(set(values) - set(option_names()))
    if unknown:
        raise InputError(f"`{unknown[0]}` is not an option of Trainer; expected one of "
                            f"{sorted(option_names())}. Received: {unknown[0]}={values[unknown[0]]!r}")
    return TrainerOptions(**values)
