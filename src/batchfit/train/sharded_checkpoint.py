"""Sharded checkpoints (``strategy="fsdp"``): each rank writes its own shard, through ``torch.distributed.checkpoint``.

A sharded checkpoint is a folder ``step-<step>/`` in the checkpoint folder: the weights and the
optimizer state as a ``torch.distributed.checkpoint`` (DCP) save (``__<rank>_0.distcp`` files and
``.metadata``), the rest of the trainer's state (counters, RNGs, history, the data position) in
``trainer.pt``, and the marker ``COMPLETE``. Complete or absent: every rank writes into the
temporary folder ``.step-<step>.sharded-tmp``; once all have finished (a collective), rank 0
writes ``trainer.pt`` and the marker, fsyncs, renames the folder to its final name and fsyncs the
checkpoint folder. A run killed at any point leaves either the previous checkpoints only, or a
temporary folder that no reader lists (the next save removes it).

DCP reshards on load, so a checkpoint written by N ranks resumes on M ranks, one process
included (there, without a process group, into plain tensors).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..core.durable import atomic_write, fsync_dir
from ..distributed import DistContext
from ..errors import CheckpointError
from .checkpoint import list_steps
from .saving import model_state, refuse_other_weights

MARKER = "COMPLETE"
TRAINER_FILE = "trainer.pt"
SHARDED_KEY = "sharded_checkpoint"  # in a loaded trainer state: the folder its tensors are in
_NAME = re.compile(r"^step-(\d+)$")


def sharded_path(folder: str | os.PathLike[str], step: int) -> Path:
    """The folder of the sharded checkpoint of ``step``."""
    return Path(folder) / f"step-{step:09d}"


def list_sharded(folder: str | os.PathLike[str]) -> list[Path]:
    """Complete sharded checkpoints (with their marker) in ``folder``, newest first."""
    return list_steps(folder, _NAME, lambda path: (path / MARKER).is_file())


def tensor_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and the optimizer's state as DCP saves and loads it: sharded DTensors under FSDP,
    plain tensors on one process, both keyed by parameter names (so any world size can load them)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(module, optimizer)
    return {"model": model, "optimizer": optim}


def save_sharded(trainer_state: dict[str, Any], module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 folder: str | os.PathLike[str], step: int, keep: int, dist: DistContext) -> Path | None:
    """Write the checkpoint of ``step`` (every rank calls this); the newest ``keep`` stay. Returns its folder
    on rank 0, ``None`` on the others."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    final, tmp = sharded_path(folder, step), folder / f".step-{step:09d}.sharded-tmp"
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir()
    _barrier(dist)  # the folder exists before any rank writes into it
    with _one_process_quiet():
        dcp.save(tensor_state(module, optimizer), checkpoint_id=tmp)
    _barrier(dist)  # every rank's shard is written (and fsynced by DCP's writer)
    if dist.is_main:
        atomic_write(tmp / TRAINER_FILE, lambda handle: torch.save(trainer_state, handle))
        def mark(handle: Any) -> None:
            handle.write(f"step {step}, {dist.world_size} ranks\n")

        atomic_write(tmp / MARKER, mark, text=True)
        fsync_dir(tmp)
        if final.exists():  # the same step written again (a signal right after a checkpoint)
            old = folder / f".step-{step:09d}.sharded-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(folder)
        for stale in list_sharded(folder)[keep:]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier(dist)  # no rank reads the folder (a rollback) before it is complete
    return final if dist.is_main else None


def load_latest_sharded(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """The trainer state of the newest readable sharded checkpoint in ``folder`` (its tensors are loaded
    later, by :func:`load_tensors`), or None when there is none."""
    for path in list_sharded(folder):
        try:
            state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
            _metadata(path)
        except Exception as error:  # a damaged checkpoint: fall back to an older one
            warnings.warn(f"skipping unreadable checkpoint {path}: {error}", RuntimeWarning, stacklevel=2)
            continue
        state[SHARDED_KEY] = str(path)
        return state, path
    return None


def check_fits_sharded(state: dict[str, Any], module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       path: Path) -> None:
    """Refuse a sharded checkpoint whose weights (names, global shapes) or optimizer groups do not fit."""
    missing = [k for k in ("step", "samples_seen", "batcher", "rng", "history", "optimizer_groups") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a sharded batchfit checkpoint of this version: "
                              f"it has no {missing}")
    saved = {key.removeprefix("model."): SimpleNamespace(shape=tuple(value.size))
             for key, value in _metadata(path).state_dict_metadata.items()
             if key.startswith("model.") and hasattr(value, "size")}
    refuse_other_weights(saved, model_state(module), f"checkpoint {path}")
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if list(state["optimizer_groups"]) != sizes:
        raise CheckpointError(f"checkpoint {path} holds an optimizer with parameter groups of "
                              f"{state['optimizer_groups']} tensors; this optimizer has {sizes}")


def load_tensors(path: str | os.PathLike[str], module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights and optimizer state of the sharded checkpoint at ``path`` into ``module`` and
    ``optimizer`` (every rank calls this; each reads what its shards need)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = tensor_state(module, optimizer)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Without a process group DCP saves and loads in this process alone, as meant: not worth its warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _metadata(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def _barrier(dist: DistContext) -> None:
    """Wait for every rank (a small all-reduce, which names a rank that died)."""
    if dist.enabled:
        dist.all_reduce_sum(torch.zeros(1, device=dist._device()))
