"""Durable files: what makes a write survive a crash.

:func:`atomic_write` is the one way batchfit writes a file whose readers must never see it half
written (checkpoints, history CSVs, plots): into a temporary sibling, flushed and fsynced, then
renamed over the final name, then the folder fsynced. A file with its final name is complete.
"""

from __future__ import annotations

import errno
import os
import shutil
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


def failed_write(error: BaseException, path: Path, what: str) -> OSError | None:
    """The ``OSError`` to raise for a failed write of ``what`` to ``path`` — a full disk named as such
    (torch reports one as an obscure ``RuntimeError`` from ``inline_container.cc``) — or ``None``
    when ``error`` is not a failed write."""
    code = getattr(error, "errno", None)
    text = str(error).strip()
    if not isinstance(error, OSError) and "inline_container" not in text and "unexpected pos" not in text \
            and "file write failed" not in text:
        return None
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    except OSError:
        free = -1
    if code in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in text or 0 <= free < 1 << 20:
        return OSError(errno.ENOSPC, f"cannot write {what} {path}: the disk is full ({max(free, 0):,} bytes free); "
                                     f"nothing was written there")
    first = text.splitlines()[0] if text else ""
    return OSError(code or errno.EIO, f"cannot write {what} {path}: {type(error).__name__}: {first}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a writer whose temporary files must be left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True
