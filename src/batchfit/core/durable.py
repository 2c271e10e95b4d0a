"""Durable files: what makes a write survive a crash.

:func:`atomic_write` is the one way batchfit writes a file whose readers must never see it half
written (checkpoints, history CSVs, plots): into a temporary sibling, flushed and fsynced, then
renamed over the final name, then the folder fsynced. A file with its final name is complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: str | os.PathLike[str] | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (fsync the folder itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], *, text: bool = False) -> Path:
    """Call ``write(handle)`` on a temporary sibling of ``path``, then make it ``path`` durably and atomically.

    The temporary name starts with a dot and holds this process's id, so that concurrent writers
    never share one; it is removed when ``write`` fails.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") if text else open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(final.parent)
    return final


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a writer whose temporary files must be left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True
