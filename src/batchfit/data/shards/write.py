"""Writing a shard folder: atomically, from a source or an iterable of batches."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.durable import fsync_dir, process_alive
from ...errors import ShardError, check_positive_int, expected
from ..sources import Batch
from .format import (
    CHUNK_BYTES,
    FORMAT,
    MANIFEST,
    SHARD_BYTES,
    VERSION,
    _columns,
    _hash_file,
    _is_ragged,
    _output_names,
    _Ragged,
    _Spec,
    _spec,
)
from .read import ShardSource
from .schema import pad_problem

# ---------------------------------------------------------------------------------------------
# Writing


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, fields)
    return header.getvalue()


class _NpyFile:
    """An .npy file written row block by row block; the header is completed on close.

    NumPy pads .npy headers so that the first dimension can grow to 21 digits without the
    header changing length, so a header written for 0 rows is overwritten in place.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape, self.rows = path, dtype, shape, 0
        self.file = open(path, "xb")  # noqa: SIM115 (closed in close())
        self.header_bytes = self.file.write(_npy_header(dtype, (0, *shape)))

    def write(self, rows: np.ndarray) -> None:
        # .data: the array's bytes as a memoryview, no copy (NumPy's stubs type the buffer protocol only from 3.12)
        self.file.write(np.ascontiguousarray(rows).reshape(-1).view(np.uint8).data)
        self.rows += len(rows)

    def close(self) -> dict[str, Any]:
        header = _npy_header(self.dtype, (self.rows, *self.shape))
        assert len(header) == self.header_bytes, "npy header changed length"
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"name": self.path.name, "bytes": self.path.stat().st_size, "blake2b": _hash_file(self.path)}


class _OpenShard:
    """The files of the shard being written; batches are appended as they arrive."""

    def __init__(self, folder: Path, number: int, specs: list[_Spec]) -> None:
        self.samples = 0
        self.files: dict[str, _NpyFile] = {}
        self.ends: dict[str, int] = {}  # values written so far, per ragged array
        for spec in specs:
            path = folder / f"shard-{number:05d}.{spec.key}.npy"
            self.files[spec.key] = _NpyFile(path, spec.dtype, spec.shape)
            if spec.ragged:
                offsets = _NpyFile(path.with_suffix(".offsets.npy"), np.dtype(np.int64), ())
                offsets.write(np.zeros(1, dtype=np.int64))
                self.files[f"{spec.key}.offsets"] = offsets
                self.ends[spec.key] = 0

    def append(self, specs: list[_Spec], columns: list[np.ndarray | _Ragged]) -> None:
        for spec, column in zip(specs, columns):
            if isinstance(column, _Ragged):
                self.files[spec.key].write(column.values)
                self.files[f"{spec.key}.offsets"].write(column.offsets[1:] + self.ends[spec.key])
                self.ends[spec.key] += int(column.offsets[-1])
            else:
                self.files[spec.key].write(column)
        self.samples += len(columns[0])

    def close(self) -> dict[str, Any]:
        return {"samples": self.samples, "files": {key: f.close() for key, f in self.files.items()}}


class _Writer:
    """Writes batches into shards of ``shard_size`` samples, holding no more than one batch."""

    def __init__(self, folder: Path, shard_size: int | None) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.names: tuple[str, ...] | None = None
        self.specs: list[_Spec] = []
        self.shards: list[dict[str, Any]] = []
        self.open: _OpenShard | None = None

    def add(self, batch: Any, number: int) -> None:
        where = f"batch {number}"
        names, columns = _columns(batch, where)
        if number == 0:
            self._start(names, columns)
        self._check(names, columns, where)
        assert self.shard_size is not None
        done, size = 0, len(columns[0])
        while done < size:
            if self.open is None:
                self.open = _OpenShard(self.folder, len(self.shards), self.specs)
            take = min(size - done, self.shard_size - self.open.samples)
            self.open.append(self.specs, [_slice(c, done, done + take) for c in columns])
            done += take
            if self.open.samples == self.shard_size:
                self.shards.append(self.open.close())
                self.open = None

    def _start(self, names: tuple[str, ...] | None, columns: list[np.ndarray | _Ragged]) -> None:
        self.names = names
        keys = names if names is not None else tuple(str(i) for i in range(len(columns)))
        self.specs = [_spec(k, c) for k, c in zip(keys, columns)]
        _output_names(names, self.specs)
        if self.shard_size is None:
            samples = max(1, len(columns[0]))
            per_sample = sum(
                c.values.nbytes / samples + 8 if isinstance(c, _Ragged) else s.row_bytes()
                for s, c in zip(self.specs, columns)
            )
            self.shard_size = max(1, int(SHARD_BYTES // max(1.0, per_sample)))

    def _check(self, names: tuple[str, ...] | None, columns: list[np.ndarray | _Ragged], where: str) -> None:
        if names != self.names or len(columns) != len(self.specs):
            layout = names if names is not None else f"{len(columns)} arrays"
            first = self.names if self.names is not None else f"{len(self.specs)} arrays"
            raise expected(where, f"the arrays of batch 0 ({first})", layout)
        for spec, column in zip(self.specs, columns):
            got = _spec(spec.key, column)
            if got != spec:
                raise expected(
                    f"{where} array {spec.key!r}",
                    f"dtype {spec.dtype}, per-sample shape {spec.shape}, ragged={spec.ragged} as in batch 0",
                    f"dtype {got.dtype}, per-sample shape {got.shape}, ragged={got.ragged}",
                )
            if len(column) != len(columns[0]):
                raise expected(f"{where} array {spec.key!r}", f"{len(columns[0])} samples like the others", len(column))

    def finish(self, pad_value: float, metadata: Mapping[str, Any] | None) -> None:
        if self.open is not None and self.open.samples:
            self.shards.append(self.open.close())
        if not self.shards:
            raise expected("data", "at least one sample", "no samples")
        for spec in self.specs:
            if spec.ragged and pad_problem(pad_value, spec.dtype):
                raise expected("pad_value", f"a value that fits {spec.dtype} (it pads {spec.key!r})", pad_value)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": sum(s["samples"] for s in self.shards),
            "names": list(self.names) if self.names is not None else None,
            "arrays": [s.to_json() for s in self.specs],
            "pad_value": pad_value,
            "shards": self.shards,
            "metadata": dict(metadata or {}),
        }
        with open(self.folder / MANIFEST, "x", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.folder)

    def abandon(self) -> None:
        if self.open is not None:
            for f in self.open.files.values():
                with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                    f.file.close()


def _slice(column: np.ndarray | _Ragged, lo: int, hi: int) -> np.ndarray | _Ragged:
    if lo == 0 and hi == len(column):
        return column
    return column.slice(lo, hi) if isinstance(column, _Ragged) else column[lo:hi]


def _as_batches(data: Any) -> Iterator[Any]:
    """The batches to write: a source in chunks, in-memory arrays as one batch, or ``data`` itself."""
    if isinstance(data, ShardSource):
        return data._stored_batches()
    if hasattr(data, "gather") and hasattr(data, "names") and hasattr(data, "__len__"):
        return _source_batches(data)
    if isinstance(data, (Mapping, np.ndarray, torch.Tensor)):
        return iter([data])
    if isinstance(data, (tuple, list)) and data and all(
        isinstance(c, (np.ndarray, torch.Tensor)) or _is_ragged(c) for c in data
    ):
        return iter([tuple(data)])
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return iter(data)
    raise expected("data", "a source, arrays, or an iterable of batches", type(data).__name__)


def _source_batches(src: Any) -> Iterator[Batch]:
    n = len(src)
    if n == 0:
        return
    first = src.gather(np.zeros(1, dtype=np.int64))
    tensors = first.values() if isinstance(first, Mapping) else first
    per_sample = max(1, sum(t.element_size() * t.numel() for t in tensors))
    chunk = max(1, CHUNK_BYTES // per_sample)
    for lo in range(0, n, chunk):
        yield src.gather(np.arange(lo, min(n, lo + chunk), dtype=np.int64))


def _prepare_destination(path: Path, overwrite: bool) -> None:
    _refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path):
        _recover(path)


_NEW_FOLDER = "a folder that does not exist yet (or pass overwrite=True; --overwrite on the command line)"


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() or path.is_symlink():
        is_shards = path.is_dir() and (path / MANIFEST).is_file()
        if not overwrite:
            raise expected("path", _NEW_FOLDER, str(path))
        if not (is_shards or (path.is_dir() and not any(path.iterdir()))):
            raise expected("path", "a shard folder or an empty folder to overwrite", f"{path}, which is neither")


def _recover(path: Path) -> None:
    """Clear what writers that died left next to ``path`` (.NAME.partial-PID-*, .NAME.old-PID-*).

    A writer killed between the two renames of an overwrite (where renaming cannot exchange two
    folders atomically) leaves no ``path`` but a complete old copy: that copy is put back, so
    the folder is as it was before the write that did not finish.
    """
    for stale in sorted([*path.parent.glob(f".{path.name}.old-*"), *path.parent.glob(f".{path.name}.partial-*")]):
        pid = stale.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if ".old-" in stale.name and not path.exists() and (stale / MANIFEST).is_file():
            os.rename(stale, path)
            fsync_dir(path.parent)
        else:
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s parent folder among shard writers (released at exit or death).

    The folder itself is locked (``flock`` on its descriptor), so no lock file is left behind.
    """
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock



_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``: True when done, False where the kernel, libc or file system lacks it."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Make the complete temporary folder ``path`` in one atomic step.

    Under the folder lock, so that two writers cannot both find ``path`` free: without
    ``overwrite`` a ``path`` that another writer created meanwhile is refused; with it, the two
    folders are exchanged atomically where Linux allows (``renameat2``), else by two renames
    whose crash window :func:`_recover` repairs.
    """
    with _folder_lock(path):
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise expected("path", _NEW_FOLDER,
                               f"{path}, which another writer created while this one wrote")
            _refuse_existing(path, overwrite)
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            if _renameat2(tmp, path, _RENAME_EXCHANGE):
                os.rename(tmp, old)  # tmp now holds the previous folder
            else:
                os.rename(path, old)
                os.rename(tmp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old)
            return
        if not _renameat2(tmp, path, _RENAME_NOREPLACE):
            os.rename(tmp, path)  # the lock keeps other batchfit writers out
        fsync_dir(path.parent)


def write_shards(
    path: str | os.PathLike,
    data: Any,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
    pad_value: float = 0,
    metadata: Mapping[str, Any] | None = None,
) -> ShardSource:
    """Write ``data`` as a shard folder at ``path`` and return it opened as a :class:`ShardSource`.

    ``data`` is a source (``len``, ``.names``, ``.gather``), aligned arrays (a tuple or dict, as
    for :class:`ArraySource`), or an iterable of batches (tuples or dicts of numpy arrays or
    tensors, e.g. a generator), so data larger than memory can be written piece by piece. A
    batch element given as a list of arrays of different lengths is a variable-length array.
    ``shard_size`` is the number of samples per shard (default: about 512 MiB per shard).
    ``pad_value`` pads variable-length arrays in batches; ``metadata`` (JSON-able) is kept in
    the manifest. The write is atomic: an existing ``path`` is refused unless ``overwrite``.
    """
    path = Path(path)
    if shard_size is not None:
        check_positive_int("shard_size", shard_size)
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)):
        raise expected("pad_value", "a number", pad_value)
    if not isinstance(overwrite, bool):
        raise expected("overwrite", "True or False", overwrite)
    try:
        json.dumps(dict(metadata or {}))
    except (TypeError, ValueError) as error:
        raise expected("metadata", "a JSON-able mapping", f"{metadata!r} ({error})") from error
    _prepare_destination(path, overwrite)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    writer = _Writer(tmp, shard_size)
    try:
        for number, batch in enumerate(_as_batches(data)):
            writer.add(batch, number)
        writer.finish(pad_value, metadata)
        _commit(tmp, path, overwrite)
    except BaseException as error:
        writer.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ShardError(f"cannot write shards to {path}: the disk is full ({error.strerror}); "
                             f"nothing was written (the partial folder {tmp.name} was removed)") from error
        raise
    return ShardSource(path, verify="none")


