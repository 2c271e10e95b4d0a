"""Checkpoints: atomic files of plain state dicts, loaded without unpickling code.

A checkpoint is ``step-<step>.pt`` in the checkpoint folder, written to a temporary file,
fsynced and renamed, then the folder is fsynced: a file with the final name is always
complete. Loading uses ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers, so a checkpoint file can never run code.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.durable import atomic_write, process_alive
from ..errors import CheckpointError
from .saving import model_state, refuse_other_weights

logger = logging.getLogger("batchfit")
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(folder: str | os.PathLike[str], step: int) -> Path:
    """The file name of the checkpoint of ``step``."""
    return Path(folder) / f"step-{step:09d}.pt"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint files in ``folder``, newest (highest step) first."""
    return list_steps(folder, _NAME)


def list_steps(folder: str | os.PathLike[str], name: re.Pattern[str],
               complete: Callable[[Path], bool] = lambda path: True) -> list[Path]:
    """The entries of ``folder`` whose name ``name`` matches (its group 1: the step) and that are
    ``complete``, highest step first; none when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := name.match(p.name)) and complete(p)]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike[str], step: int, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep`` files.

    A write that fails (a full disk, above all) raises an ``OSError`` naming the file and the
    reason — torch reports a full disk as an obscure ``RuntimeError`` — and the checkpoints
    written before stay as they were.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, step)
    try:
        final = atomic_write(path, lambda handle: torch.save(state, handle))
    except (OSError, RuntimeError) as error:
        why, full = _write_failure(error, folder)
        if not isinstance(error, OSError) and not full:
            raise
        code = errno.ENOSPC if full else error.errno  # type: ignore[union-attr]
        raise OSError(code, f"cannot write checkpoint {path}: {why}; the earlier checkpoints in {folder} "
                            f"are kept") from error
    # The file just written always stays, even when a newer-named one exists (an unreadable
    # file that a resume skipped): pruning it could leave no readable checkpoint at all.
    for old in [p for p in list_checkpoints(folder) if p != final][keep - 1 :]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".step-*.tmp"):
        # Left by a process killed while writing; never a complete checkpoint. Another live
        # writer's file is left alone (the folder lock keeps a second run out, but not a user's
        # own save_checkpoint from another process).
        pid = stale.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)
    return final


def _write_failure(error: BaseException, folder: Path) -> tuple[str, bool]:
    """Why a write failed, in words, and whether the disk is full (named as such: torch reports it obscurely)."""
    code = getattr(error, "errno", None)
    free = shutil.disk_usage(folder).free
    if code in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(error) or free < 1 << 20:
        return f"the disk is full ({free:,} bytes free)", True
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}", False



class FolderLock:
    """One live run per checkpoint folder: an exclusive ``flock`` on the folder itself.

    The kernel releases the lock when the process ends, however it ends, so a crashed run never
    blocks the next one, and no lock file is left in the folder. A second run on the same folder
    is refused, naming the first one's pid (read from ``/proc/locks`` where Linux has it).
    A forked child (a data-loading worker) closes its copy of the descriptor at once: a flock
    belongs to the open file, so a copy held by a worker that outlives a killed run for a
    moment would refuse the restart.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`CheckpointError` naming the process that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(os.fstat(fd).st_ino)
            os.close(fd)
            raise CheckpointError(f"checkpoint_dir {self.folder} is in use by another run (pid {owner}); two runs "
                                  f"would overwrite each other's checkpoints: give this run its own folder, or "
                                  f"wait for that one to end") from None
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        """Let the next run in."""
        if self._fd is not None and self._fd in _HELD:  # in a forked child it was closed already
            _HELD.discard(self._fd)
            os.close(self._fd)
        self._fd = None


_HELD: set[int] = set()  # the descriptors of the locks this process holds


def _drop_locks_in_child() -> None:
    """In a forked child: close the inherited descriptors of every lock, so that the lock dies with the run."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass  # closed already
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _lock_owner(inode: int) -> str:
    """The pid holding a flock on the file with ``inode``, from ``/proc/locks`` (``"unknown"`` elsewhere)."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and len(fields) > 5 and fields[5].endswith(f":{inode}"):
            return fields[4]
    return "unknown"


def load_latest(folder: str | os.PathLike[str], map_location: Any = "cpu",
                skipped: list[Path] | None = None) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in ``folder``, or None when there is none.

    An unreadable file is skipped with a warning in favour of the one before it (and appended to
    ``skipped``, when given).
    """
    for path in list_checkpoints(folder):
        try:
            return torch.load(path, map_location=map_location, weights_only=True), path
        except Exception as error:  # a damaged file of any kind: fall back to an older one
            warnings.warn(f"skipping unreadable checkpoint {path}: {error}", RuntimeWarning, stacklevel=2)
            if skipped is not None:
                skipped.append(path)
    return None


def check_fits(state: dict[str, Any], module: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Refuse a checkpoint whose parts do not fit ``module`` and ``optimizer`` — before anything is loaded.

    Checks that every part a resume loads is there, that the weights have this model's names and
    shapes, and that the optimizer state has this optimizer's parameter groups, so that a failed
    resume leaves model and optimizer as they were.
    """
    missing = [k for k in ("model", "optimizer", "step", "samples_seen", "batcher", "rng", "history") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a batchfit checkpoint of this version: it has no {missing}")
    refuse_other_weights(state["model"], model_state(module), f"checkpoint {path}")
    groups = state["optimizer"].get("param_groups", [])
    sizes = [len(group["params"]) for group in optimizer.state_dict()["param_groups"]]
    if [len(group.get("params", [])) for group in groups] != sizes:
        raise CheckpointError(f"checkpoint {path} holds an optimizer with parameter groups of "
                              f"{[len(g.get('params', [])) for g in groups]} tensors; this optimizer has {sizes}")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """Refuse to resume a run whose configuration differs in one of ``keys``."""
    for key in keys:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(
                f"checkpoint {path} was written with {key}={saved[key]!r}, but this run has "
                f"{key}={current.get(key)!r}; use another checkpoint_dir or the same setting"
            )
