"""The Trainer's options: one frozen dataclass, validated once.

Every plain-valued option of :class:`~batchfit.Trainer` is a field here, with its type, its
default and its check; the TOML schema of ``[train]`` is derived from these fields
(:func:`toml_types`), so every Trainer option is a config key. Options that are Python objects
(callbacks, metrics, ``lr_schedule``, ``loss_count``, ``transform``) are the Trainer's own
arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import torch

from ..core.precision import PRECISIONS, Precision
from ..data.order import SHUFFLES
from ..errors import check_choice, check_positive_int, check_seed, expected
from ..sharding import STRATEGIES, Strategy

BatchMode = Literal["full", "auto", "adaptive"]
LRRule = Literal["linear", "sqrt", "adascale"]
OnNaN = Literal["raise", "skip", "rollback"]
Shuffle = Union[bool, Literal["full", "block", "length"]]  # noqa: UP007 (evaluated at run time on 3.10)

BATCH_MODES: tuple[str, ...] = get_args(BatchMode)
LR_RULES: tuple[str | None, ...] = (None, *get_args(LRRule))
ON_NAN: tuple[str, ...] = get_args(OnNaN)
# Steps between two noise-scale measurements (each splits its batch in two micro-batches).
NOISE_EVERY = 4
# Settings that must match for a checkpoint to be resumed.
RESUME_KEYS = ("batch_size", "shuffle", "drop_last", "seed", "num_samples", "optimizer", "lrs", "data_fingerprint")


@dataclass(frozen=True)
class TrainerOptions:
    """Every plain-valued option of the Trainer; see the README for what each does."""

    batch_size: int | BatchMode = 64
    micro_batch_size: int | Literal["auto"] | None = None
    micro_batch_tokens: int | Literal["auto"] | None = None
    batch_tokens: int | None = None
    shuffle: Shuffle = True
    drop_last: bool = False
    lr_scaling: LRRule | None = None
    base_batch_size: int | None = None
    warmup_steps: int = 0
    lr_schedule_interval: Literal["step", "epoch"] = "step"
    device: str | torch.device = "auto"
    precision: Precision = "fp32"
    max_grad_norm: float | None = None
    on_nan: OnNaN = "raise"
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    checkpoint_seconds: float | None = None
    keep_checkpoints: int = 3
    eval_batch_size: int | None = None
    noise_scale: bool = False
    max_batch_size: int | None = None
    prefetch: int = 0
    workers: int = 0
    progress: bool | Literal["epochs"] = True
    val_every: int | None = None
    gradient_checkpointing: bool = False
    strategy: Strategy = "ddp"
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_batching()
        self._check_lr()
        if not isinstance(self.device, (str, torch.device)):
            raise expected("device", "'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device", self.device)
        check_choice("precision", self.precision, PRECISIONS)
        self._check_guards()
        self._check_checkpoints()
        for name in ("eval_batch_size", "max_batch_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("prefetch", "workers"):
            check_positive_int(name, getattr(self, name), allow_zero=True)
        for name in ("noise_scale", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise expected(name, "True or False", getattr(self, name))
        check_choice("progress", self.progress, (True, False, "epochs"))
        if self.val_every is not None:
            check_positive_int("val_every", self.val_every)
        check_seed(self.seed)
        self._check_strategy()

    def _check_strategy(self) -> None:
        """``"ddp"`` or ``"fsdp"``; what FSDP does not support yet is refused, not done otherwise."""
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.strategy != "fsdp":
            return
        unsupported = [(self.measured_batch, f"batch_size={self.batch_size!r}"),
                       (self.tracks_noise, "the gradient noise scale (noise_scale, 'adaptive', 'adascale')"),
                       (self.precision == "fp16", "precision='fp16' (its GradScaler is not shard-aware)")]
        for found, what in unsupported:
            if found:
                raise expected("strategy", f"'ddp' with {what}: strategy='fsdp' does not support it yet",
                               self.strategy)

    def _check_batching(self) -> None:
        """Batch and micro-batch sizes, token budgets, order."""
        check_batch_size(self.batch_size)
        micro = self.micro_batch_size
        if micro is not None and micro != "auto":
            check_positive_int("micro_batch_size", micro)
            if isinstance(self.batch_size, int) and isinstance(micro, int) and micro > self.batch_size:
                raise expected("micro_batch_size", f"at most batch_size={self.batch_size}", micro)
        if self.micro_batch_tokens not in (None, "auto"):
            check_positive_int("micro_batch_tokens", self.micro_batch_tokens)
        if self.batch_tokens is not None:
            check_positive_int("batch_tokens", self.batch_tokens)
        if self.micro_batch_tokens is not None and micro == "auto":
            raise expected("micro_batch_size", "an int or None with micro_batch_tokens (one budget is measured "
                           "or given, not both)", micro)
        if self.batch_tokens is not None:
            if self.measured_batch:
                raise expected("batch_tokens", "None with a measured batch size (batch_size="
                               f"{self.batch_size!r}); batches are cut either by tokens or by the measurement",
                               self.batch_tokens)
            if self.drop_last:
                raise expected("drop_last", "False with batch_tokens", self.drop_last)
        check_choice("shuffle", self.shuffle, SHUFFLES)
        if not isinstance(self.drop_last, bool):
            raise expected("drop_last", "True or False", self.drop_last)

    def _check_lr(self) -> None:
        """Learning-rate scaling, warm-up and the schedule's interval."""
        check_choice("lr_scaling", self.lr_scaling, LR_RULES)
        if self.lr_scaling is not None and self.base_batch_size is None:
            raise expected("base_batch_size", "the batch size the optimizer's lr was tuned for "
                           "(required with lr_scaling)", self.base_batch_size)
        if self.base_batch_size is not None:
            check_positive_int("base_batch_size", self.base_batch_size)
        check_positive_int("warmup_steps", self.warmup_steps, allow_zero=True)
        check_choice("lr_schedule_interval", self.lr_schedule_interval, ("step", "epoch"))

    def _check_guards(self) -> None:
        """The non-finite loss policy and gradient clipping."""
        check_choice("on_nan", self.on_nan, ON_NAN)
        grad_norm = self.max_grad_norm
        if grad_norm is not None and (isinstance(grad_norm, bool) or not isinstance(grad_norm, (int, float))
                                      or not math.isfinite(grad_norm) or grad_norm <= 0):
            raise expected("max_grad_norm", "a positive number or None", grad_norm)
        if grad_norm is not None:
            object.__setattr__(self, "max_grad_norm", float(grad_norm))

    def _check_checkpoints(self) -> None:
        """The checkpoint folder and what needs one."""
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
                raise expected("checkpoint_dir", "a folder path (str or os.PathLike) or None", self.checkpoint_dir)
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
            if os.path.exists(self.checkpoint_dir) and not os.path.isdir(self.checkpoint_dir):
                raise expected("checkpoint_dir", "a folder (or a path where one can be made)",
                               f"{self.checkpoint_dir}, which is a file")
        if self.checkpoint_every is not None:
            check_positive_int("checkpoint_every", self.checkpoint_every)
            if self.checkpoint_dir is None:
                raise expected("checkpoint_dir", "a folder when checkpoint_every is set", None)
        seconds = self.checkpoint_seconds
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
                raise expected("checkpoint_seconds", "a positive number of seconds or None", seconds)
            if self.checkpoint_dir is None:
                raise expected("checkpoint_dir", "a folder when checkpoint_seconds is set", None)
        if self.on_nan == "rollback" and self.checkpoint_dir is None:
            raise expected("checkpoint_dir", "a folder when on_nan='rollback'", None)
        check_positive_int("keep_checkpoints", self.keep_checkpoints)

    @property
    def measured_batch(self) -> bool:
        """Whether the batch size is measured (``"auto"``/``"adaptive"``) rather than given."""
        return self.batch_size in ("auto", "adaptive")

    @property
    def tracks_noise(self) -> bool:
        """Whether the run keeps a continuous noise-scale estimate (asked for, or needed by its modes)."""
        return self.noise_scale or self.batch_size == "adaptive" or self.lr_scaling == "adascale"


def check_batch_size(batch_size: Any) -> None:
    """Refuse anything but a positive integer, ``"full"``, ``"auto"`` or ``"adaptive"``."""
    if isinstance(batch_size, str) and batch_size in BATCH_MODES:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise expected("batch_size", "a positive integer, 'full', 'auto' or 'adaptive'", batch_size)


def option_names() -> tuple[str, ...]:
    """The names of the Trainer's plain-valued options, in order."""
    return tuple(f.name for f in dataclasses.fields(TrainerOptions))


def toml_types() -> dict[str, tuple[tuple[type, ...], Any]]:
    """``name -> (accepted TOML value types, default)`` of each option, derived from its annotation."""
    hints = typing.get_type_hints(TrainerOptions, globalns=globals())  # (its __module__ is "batchfit")
    return {f.name: (_toml_types(hints[f.name]), f.default) for f in dataclasses.fields(TrainerOptions)}


def _toml_types(annotation: Any) -> tuple[type, ...]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        found: list[type] = []
        for arg in get_args(annotation):
            found += [t for t in _toml_types(arg) if t not in found]
        return tuple(found)
    if origin is Literal:
        return tuple(dict.fromkeys(type(value) for value in get_args(annotation)))
    if annotation is type(None):
        return ()
    if annotation is float:
        return (int, float)
    if annotation in (int, bool, str):
        return (annotation,)
    return (str,)  # paths and devices are written as strings
