"""Checkpoints: atomic files of plain state dicts, loaded without unpickling code.

A checkpoint is ``step-<step>.pt`` in the checkpoint folder, written to a temporary file,
fsynced and renamed, then the folder is fsynced: a file with the final name is always
complete. Loading uses ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers, so a checkpoint file can never run code.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.durable import atomic_write
from ..errors import CheckpointError

logger = logging.getLogger("batchfit")
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(folder: str | os.PathLike[str], step: int) -> Path:
    """The file name of the checkpoint of ``step``."""
    return Path(folder) / f"step-{step:09d}.pt"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint files in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike[str], step: int, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep`` files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = atomic_write(checkpoint_path(folder, step), lambda handle: torch.save(state, handle))
    # The file just written always stays, even when a newer-named one exists (an unreadable
    # file that a resume skipped): pruning it could leave no readable checkpoint at all.
    for old in [p for p in list_checkpoints(folder) if p != final][keep - 1 :]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".step-*.tmp"):
        # Left by a process killed while writing; never a complete checkpoint.
        if not stale.name.endswith(f".{os.getpid()}.tmp"):
            stale.unlink(missing_ok=True)
    return final


def load_latest(folder: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in ``folder``, or None when there is none.

    An unreadable file is skipped with a warning in favour of the one before it.
    """
    for path in list_checkpoints(folder):
        try:
            return torch.load(path, map_location=map_location, weights_only=True), path
        except Exception as error:  # a damaged file of any kind: fall back to an older one
            warnings.warn(f"skipping unreadable checkpoint {path}: {error}", RuntimeWarning, stacklevel=2)
    return None


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """Refuse to resume a run whose configuration differs in one of ``keys``."""
    for key in keys:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(
                f"checkpoint {path} was written with {key}={saved[key]!r}, but this run has "
                f"{key}={current.get(key)!r}; use another checkpoint_dir or the same setting"
            )
