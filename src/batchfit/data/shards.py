"""The shard format: data larger than memory, on disk, memory-mapped and checksummed.

A shard folder holds ``manifest.json`` and, for every shard, one ``.npy`` file per array
(``shard-00000.x.npy``), which numpy can memory-map. A variable-length array (token
sequences) stores its samples end to end in ``shard-00000.tokens.npy`` and where each sample
starts in ``shard-00000.tokens.offsets.npy`` (``int64``, one more entry than samples).

The manifest records the format version, the array names (or positions), dtypes, per-sample
shapes, samples per shard, and the size and BLAKE2b checksum of every file. A folder is
written under a temporary sibling name, every file and the folder are fsynced, and only then
is it renamed into place, so an interrupted write never leaves a folder that opens.

Variable-length arrays come out of :meth:`ShardSource.gather` padded to the longest sample of
the batch, followed by an ``int64`` tensor of lengths: named sources get an extra key
``<name>_lengths`` right after ``<name>``; tuple sources get the lengths right after the array,
except for the last array of a tuple of two or more (the target), whose lengths come just
before it so the target stays last.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import mmap
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..durable import fsync_dir
from ..errors import ShardError, check_choice, check_positive_int, expected
from .sources import Batch, pack

FORMAT = "batchfit-shards"
VERSION = 1
MANIFEST = "manifest.json"
VERIFY_MODES = ("open", "full", "none")
SHARD_BYTES = 512 * 2**20  # target size of a shard when shard_size is not given
CHUNK_BYTES = 32 * 2**20  # how much of a source is gathered at once while writing
MAPPED_BYTES = 256 * 2**20  # default bound on the file pages a ShardSource keeps mapped
# A page fault on a memory map can map a whole large folio of the page cache (2 MiB on x86-64
# Linux with large folios), so every sample read may add that much to the resident set.
_FAULT_BYTES = 2 * 2**20
_NAME = re.compile(r"[A-Za-z0-9_-]+")


# ---------------------------------------------------------------------------------------------
# Columns: what one array of a batch looks like while it is written


@dataclass
class _Ragged:
    """Variable-length samples: their values end to end, and where each sample starts."""

    values: np.ndarray
    offsets: np.ndarray  # int64, len(samples) + 1, offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def slice(self, lo: int, hi: int) -> _Ragged:
        start, stop = int(self.offsets[lo]), int(self.offsets[hi])
        return _Ragged(self.values[start:stop], self.offsets[lo : hi + 1] - start)


@dataclass(frozen=True)
class _Spec:
    """One stored array: its key (name or position), dtype and per-sample shape."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]  # per sample; for a ragged array, the shape after the length
    ragged: bool

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "dtype": self.dtype.str, "shape": list(self.shape), "ragged": self.ragged}

    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def _numpy(where: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise expected(where, "an array with a numpy dtype", "a bfloat16 tensor")
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biufc":
        raise expected(where, "a numeric array", f"an array of dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


def _is_ragged(value: Any) -> bool:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return True
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (np.ndarray, torch.Tensor, list)) for v in value
    )


def _column(where: str, value: Any) -> np.ndarray | _Ragged:
    """A batch element as a dense array, or as a ragged column when it is a list of arrays."""
    if isinstance(value, _Ragged):
        return value
    if not _is_ragged(value):
        array = _numpy(where, value)
        if array.ndim == 0:
            raise expected(where, "an array whose first dimension counts samples", "a 0-d scalar")
        return array
    samples = [_numpy(f"{where}[{i}]", v) for i, v in enumerate(value)]
    for i, sample in enumerate(samples):
        if sample.ndim == 0 or sample.shape[1:] != samples[0].shape[1:] or sample.dtype != samples[0].dtype:
            raise expected(
                f"{where}[{i}]",
                f"a sequence like {where}[0] (dtype {samples[0].dtype}, shape (length, *{samples[0].shape[1:]}))",
                f"dtype {sample.dtype}, shape {sample.shape}",
            )
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in samples], out=offsets[1:])
    return _Ragged(np.concatenate(samples), offsets)


def _columns(batch: Any, where: str) -> tuple[tuple[str, ...] | None, list[np.ndarray | _Ragged]]:
    """``(names, columns)`` of a tuple, dict or single-array batch."""
    if isinstance(batch, Mapping):
        names = tuple(batch)
        for name in names:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise expected(f"{where} key", "a name of letters, digits, '_' or '-'", name)
        return names, [_column(f"{where}[{n!r}]", v) for n, v in batch.items()]
    if isinstance(batch, (np.ndarray, torch.Tensor)):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)) or not batch:
        raise expected(where, "a tuple or dict of arrays", type(batch).__name__)
    return None, [_column(f"{where}[{i}]", v) for i, v in enumerate(batch)]


def _spec(key: str, column: np.ndarray | _Ragged) -> _Spec:
    array = column.values if isinstance(column, _Ragged) else column
    try:
        torch.from_numpy(np.zeros(1, dtype=array.dtype))
    except TypeError:
        raise expected(f"array {key!r}", "a dtype torch supports", str(array.dtype)) from None
    return _Spec(key, array.dtype, tuple(array.shape[1:]), isinstance(column, _Ragged))


def _output_names(names: tuple[str, ...] | None, specs: list[_Spec]) -> tuple[str, ...] | None:
    if names is None:
        return None
    taken = set(names)
    out: list[str] = []
    for spec in specs:
        out.append(spec.key)
        if spec.ragged:
            if f"{spec.key}_lengths" in taken:
                raise expected("names", f"no array named {spec.key}_lengths beside ragged {spec.key!r}", names)
            out.append(f"{spec.key}_lengths")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Writing


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, fields)
    return header.getvalue()


def _hash_file(path: Path) -> str:
    digest, buffer = hashlib.blake2b(), bytearray(4 * 2**20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


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
        self.file.write(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
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
    if path.exists() or path.is_symlink():
        is_shards = path.is_dir() and (path / MANIFEST).is_file()
        if not overwrite:
            raise expected("path", "a folder that does not exist yet (or pass overwrite=True)", str(path))
        if not (is_shards or (path.is_dir() and not any(path.iterdir()))):
            raise expected("path", "a shard folder or an empty folder to overwrite", f"{path}, which is neither")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of writers that died: .NAME.partial-PID-* (and .NAME.old-PID-* of an overwrite).
    for stale in [*path.parent.glob(f".{path.name}.partial-*"), *path.parent.glob(f".{path.name}.old-*")]:
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(tmp: Path, path: Path) -> None:
    """Move a complete temporary folder to ``path``, replacing an old shard folder there."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)


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
    _prepare_destination(path, overwrite)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    writer = _Writer(tmp, shard_size)
    try:
        for number, batch in enumerate(_as_batches(data)):
            writer.add(batch, number)
        writer.finish(pad_value, metadata)
        _commit(tmp, path)
    except BaseException:
        writer.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardSource(path, verify="none")


# ---------------------------------------------------------------------------------------------
# Reading


def _manifest_error(path: Path, problem: str) -> ShardError:
    return ShardError(f"Shard manifest {path} {problem}")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed and checked ``manifest.json`` of a shard folder; raises :class:`ShardError`."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ShardError(f"Shard folder {folder} does not exist (an interrupted write leaves none)")
    if not path.is_file():
        raise ShardError(f"Shard manifest {path} is missing: {folder} is not a complete shard folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _manifest_error(path, f"cannot be read as JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _manifest_error(path, f"is not a {FORMAT!r} manifest (expected format={FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise _manifest_error(
            path, f"has format version {manifest.get('version')!r}; this batchfit reads version {VERSION}"
        )
    try:
        _check_manifest(manifest)
    except (KeyError, TypeError, ValueError) as error:
        raise _manifest_error(path, f"is malformed: {type(error).__name__}: {error}") from None
    return manifest


def _check_manifest(manifest: dict[str, Any]) -> None:
    specs = [_Spec(a["key"], np.dtype(a["dtype"]), tuple(a["shape"]), bool(a["ragged"])) for a in manifest["arrays"]]
    names = manifest["names"]
    if names is not None and list(names) != [s.key for s in specs]:
        raise ValueError(f"names {names} differ from array keys {[s.key for s in specs]}")
    counts = [int(s["samples"]) for s in manifest["shards"]]
    if sum(counts) != manifest["num_samples"] or not counts or min(counts) < 1:
        raise ValueError(f"samples per shard {counts} do not add up to num_samples={manifest['num_samples']}")
    for shard in manifest["shards"]:
        wanted = {s.key for s in specs} | {f"{s.key}.offsets" for s in specs if s.ragged}
        if set(shard["files"]) != wanted:
            raise ValueError(f"a shard lists files {sorted(shard['files'])}, expected {sorted(wanted)}")
        for entry in shard["files"].values():
            name = entry["name"]
            if Path(name).name != name or name.startswith(".") or int(entry["bytes"]) < 0:
                raise ValueError(f"bad file entry {entry}")
            str(entry["blake2b"])


def _file_problem(path: Path, entry: dict[str, Any], full: bool) -> str | None:
    """What is wrong with one shard file (missing, wrong size, wrong checksum), or ``None``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != entry["bytes"]:
        return f"has {size} bytes, but the manifest says {entry['bytes']} (truncated or overwritten)"
    if full:
        found, wanted = _hash_file(path), entry["blake2b"]
        if found != wanted:
            return f"is corrupt: its blake2b checksum is {found[:16]}..., the manifest says {wanted[:16]}..."
    return None


class _MappedArray:
    """One .npy shard file, memory-mapped read-only, whose resident pages can be dropped."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                found_shape, fortran, found_dtype = read(f)
            except ValueError as error:
                raise ShardError(f"Shard file {path} has no valid .npy header: {error}") from None
            if (found_dtype, tuple(found_shape), fortran) != (dtype, shape, False):
                raise ShardError(
                    f"Shard file {path} holds dtype {found_dtype}, shape {tuple(found_shape)}; "
                    f"the manifest says dtype {dtype}, shape {shape}"
                )
            header_bytes = f.tell()
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(shape)
        array = np.frombuffer(self._map, dtype, count, header_bytes) if count else np.empty(0, dtype)
        self.array = array.reshape(shape)
        self.header_bytes = header_bytes
        self.seen = np.zeros(len(self._map) // _FAULT_BYTES + 1, dtype=bool)  # regions read since the last drop

    def mark(self, first: np.ndarray, last: np.ndarray) -> int:
        """Mark the regions holding bytes ``first[i]..last[i]`` as read; return how many are new."""
        if len(first) and int((last - first).max()) >= _FAULT_BYTES:  # rows spanning 3+ regions
            return len(first) * (int((last - first).max()) // _FAULT_BYTES + 2)
        before = int(np.count_nonzero(self.seen))
        self.seen[first // _FAULT_BYTES] = True
        self.seen[last // _FAULT_BYTES] = True
        return int(np.count_nonzero(self.seen)) - before

    def drop(self) -> None:
        """Unmap the pages read so far: they stay in the page cache but leave this process's RSS."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
        self.seen[:] = False


_Group = tuple[int, np.ndarray, int, int]  # shard, indices inside it, rows lo:hi of the sorted batch


class ShardSource:
    """A shard folder written by :func:`write_shards`, read as a source.

    ``verify="open"`` (default) checks every file's size against the manifest, ``"full"`` also
    every checksum, ``"none"`` only reads the manifest; any problem is a :class:`ShardError`
    naming the file. Files are memory-mapped lazily, on first use. Batches are gathered by
    vectorised indexing, one call per array and shard touched, never one per sample. Pages of
    the maps that reading touched are dropped whenever they may exceed ``max_mapped_bytes``,
    so resident memory stays bounded however large the data. ``pad_value`` (default: the one
    stored by :func:`write_shards`) pads variable-length arrays.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        verify: str = "open",
        *,
        pad_value: float | None = None,
        max_mapped_bytes: int = MAPPED_BYTES,
    ) -> None:
        self.path = Path(path)
        check_choice("verify", verify, VERIFY_MODES)
        self.max_mapped_bytes = check_positive_int("max_mapped_bytes", max_mapped_bytes)
        manifest = read_manifest(self.path)
        self.manifest = manifest
        self.specs = [_Spec(a["key"], np.dtype(a["dtype"]), tuple(a["shape"]), a["ragged"]) for a in manifest["arrays"]]
        stored_names = tuple(manifest["names"]) if manifest["names"] is not None else None
        self.names: tuple[str, ...] | None = _output_names(stored_names, self.specs)
        self.pad_value = manifest["pad_value"] if pad_value is None else pad_value
        self.shard_sizes: list[int] = [s["samples"] for s in manifest["shards"]]
        self._start_list = [0, *itertools.accumulate(self.shard_sizes)]
        self._starts = np.array(self._start_list, dtype=np.int64)
        self._len = int(manifest["num_samples"])
        self._row_bytes = {spec.key: spec.row_bytes() for spec in self.specs}
        self._any_ragged = any(spec.ragged for spec in self.specs)
        total = sum(e["bytes"] for shard in manifest["shards"] for e in shard["files"].values())
        self._fits = total <= self.max_mapped_bytes  # then maps stay whole: nothing to count
        if verify != "none":
            self.verify(full=verify == "full")
        self._lock = threading.RLock()
        self._maps: dict[tuple[int, str], _MappedArray] = {}
        self._resident = 0  # bytes of the maps that may be resident since the last drop
        self._baseline = _mapped_file_bytes()  # the process's mapped file bytes after the last drop

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``metadata`` given to :func:`write_shards` (e.g. class names of an image folder)."""
        return self.manifest.get("metadata", {})

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ShardSource({str(self.path)!r}, samples={self._len}, shards={len(self.shard_sizes)})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"], state["_maps"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._maps, self._resident = threading.RLock(), {}, 0
        self._baseline = _mapped_file_bytes()

    def verify(self, full: bool = True) -> None:
        """Check every shard file's size against the manifest, and its checksum when ``full``."""
        for shard in self.manifest["shards"]:
            for entry in shard["files"].values():
                problem = _file_problem(self.path / entry["name"], entry, full)
                if problem is not None:
                    raise ShardError(f"Shard file {self.path / entry['name']} {problem}")

    def summary(self) -> str:
        """A few lines describing the folder: samples, shards, bytes and arrays."""
        total = sum(e["bytes"] for s in self.manifest["shards"] for e in s["files"].values())
        lines = [f"{self.path}: {self._len} samples in {len(self.shard_sizes)} shards, {total / 2**20:.1f} MiB"]
        for spec in self.specs:
            shape = ("length", *spec.shape) if spec.ragged else spec.shape
            lines.append(f"  {spec.key}: {spec.dtype}, per-sample shape {tuple(shape)}")
        return "\n".join(lines)

    def close(self) -> None:
        """Release the memory maps (they are opened again when needed)."""
        with self._lock:
            self._maps.clear()
            self._resident = 0

    # -- memory maps --------------------------------------------------------------------------

    def _map(self, shard: int, part: str) -> _MappedArray:
        mapped = self._maps.get((shard, part))
        if mapped is None:
            with self._lock:
                mapped = self._maps.get((shard, part))
                if mapped is None:
                    mapped = self._maps[(shard, part)] = self._open_map(shard, part)
        return mapped

    def _open_map(self, shard: int, part: str) -> _MappedArray:
        entry = self.manifest["shards"][shard]["files"][part]
        path = self.path / entry["name"]
        problem = _file_problem(path, entry, full=False)
        if problem is not None:
            raise ShardError(f"Shard file {path} {problem}")
        count = self.shard_sizes[shard]
        if part.endswith(".offsets"):
            return _MappedArray(path, np.dtype(np.int64), (count + 1,))
        spec = next(s for s in self.specs if s.key == part)
        if spec.ragged:
            count = int(self._map(shard, f"{part}.offsets").array[-1])
        return _MappedArray(path, spec.dtype, (count, *spec.shape))

    def _count(self, grow: int) -> bool:
        """Count ``grow`` more bytes that reading may have mapped; past ``max_mapped_bytes``,
        measure the real growth (``/proc/self/statm``) and drop every map if it is large too.

        Returns whether the maps were dropped.
        """
        self._resident += grow
        if self._resident <= self.max_mapped_bytes:
            return False
        with self._lock:
            now = _mapped_file_bytes()
            if now is not None and self._baseline is not None and now - self._baseline < self.max_mapped_bytes // 2:
                self._resident = max(0, now - self._baseline)  # count on from the measured growth
                return False
            for each in self._maps.values():
                each.drop()
            self._resident = 0
            self._baseline = _mapped_file_bytes()
            return True

    def _read(self, mapped: _MappedArray, first: np.ndarray, last: np.ndarray, read: Callable[[slice], None]) -> None:
        """``read()`` the bytes ``first[i]..last[i]`` of a map, keeping the mapped bytes bounded.

        A page fault can map a whole 2 MiB region of the file, so the bound counts regions.
        Sparse reads that would touch many new regions are done in pieces, counted in between.
        """
        if self._fits:  # all maps together fit the bound: nothing to count
            read(slice(None))
            return
        new = mapped.mark(first, last)
        if new * _FAULT_BYTES <= self.max_mapped_bytes // 2:
            if self._count(new * _FAULT_BYTES):  # dropped: these regions are mapped again
                self._count(mapped.mark(first, last) * _FAULT_BYTES)
            read(slice(None))
            return
        step = max(1, self.max_mapped_bytes // 4 // _FAULT_BYTES)
        for lo in range(0, len(first), step):
            read(slice(lo, lo + step))
            self._count(len(first[lo : lo + step]) * _FAULT_BYTES)

    # -- gathering -----------------------------------------------------------------------------

    def gather(self, indices: np.ndarray | torch.Tensor, pin_memory: bool = False) -> Batch:
        """The batch of the samples at ``indices`` (1-D integer array or tensor), in that order.

        Indices are sorted and grouped by shard; each shard is indexed once and the rows are
        put back into the requested order.
        """
        indices = self._check_indices(indices)
        groups, order = self._groups(indices)
        if order is None and not pin_memory and groups and not self._any_ragged:  # the common case
            shard, local = groups[0][0], groups[0][1]
            return pack(self.names, [self._take(shard, spec, local) for spec in self.specs])
        inverse = None
        if order is not None:  # row i of the output is row inverse[i] of the sorted batch
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
        out: list[torch.Tensor] = []
        for position, spec in enumerate(self.specs):
            if spec.ragged:
                padded, lengths = self._gather_ragged(spec, groups, order, len(indices), pin_memory)
                target_last = position == len(self.specs) - 1 and position > 0 and self.names is None
                out.extend([lengths, padded] if target_last else [padded, lengths])
            else:
                out.append(self._gather_dense(spec, groups, inverse, len(indices), pin_memory))
        return pack(self.names, out)

    def _check_indices(self, indices: Any) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise expected("indices", "a 1-D array of integers", f"shape {indices.shape}, dtype {indices.dtype}")
        indices = indices.astype(np.int64, copy=False)
        # Seen as unsigned, a negative index is huge, so one max() checks both bounds.
        if len(indices) and int(indices.view(np.uint64).max()) >= self._len:
            low, high = int(indices.min()), int(indices.max())
            raise expected("indices", f"sample indices in [0, {self._len})", f"indices from {low} to {high}")
        return indices

    def _groups(self, indices: np.ndarray) -> tuple[list[_Group], np.ndarray | None]:
        """The shard groups of a batch, and the order that sorts it (``None``: left unsorted)."""
        if len(indices) == 0:
            return [], None
        if len(self.shard_sizes) == 1:
            return [(0, indices, 0, len(indices))], None
        order = np.argsort(indices)
        ordered = indices[order]
        shard_of = np.searchsorted(self._starts, ordered, side="right") - 1
        cuts = [0, *(np.flatnonzero(shard_of[1:] != shard_of[:-1]) + 1).tolist(), len(ordered)]
        shards = shard_of[cuts[:-1]].tolist()
        if len(shards) == 1:  # all in one shard: no need to reorder
            return [(shards[0], indices - self._start_list[shards[0]], 0, len(indices))], None
        starts = self._start_list
        return [(s, ordered[lo:hi] - starts[s], lo, hi) for s, lo, hi in zip(shards, cuts, cuts[1:])], order

    def _take(
        self, shard: int, spec: _Spec, local: np.ndarray, out: np.ndarray | None = None, numpy: bool = False
    ) -> Any:
        """Rows ``local`` of one shard's array: a tensor, or a NumPy array (``out`` when given)."""
        mapped = self._maps.get((shard, spec.key)) or self._map(shard, spec.key)
        if self._fits:  # the common case, kept short
            rows = mapped.array.take(local, axis=0, out=out, mode="clip")
            return rows if numpy or out is not None else torch.from_numpy(rows)
        rows = np.empty((len(local), *spec.shape), spec.dtype) if out is None else out

        def read(part: slice) -> None:
            # mode="clip" skips NumPy's bounds-check buffering; _check_indices checked the bounds.
            mapped.array.take(local[part], axis=0, out=rows[part], mode="clip")

        first = mapped.header_bytes + local * self._row_bytes[spec.key]
        self._read(mapped, first, first + max(0, self._row_bytes[spec.key] - 1), read)
        return rows if numpy or out is not None else torch.from_numpy(rows)

    def _gather_dense(
        self, spec: _Spec, groups: list[_Group], inverse: np.ndarray | None, size: int, pin: bool
    ) -> torch.Tensor:
        out = _empty((size, *spec.shape), spec.dtype, pin)
        if inverse is None:
            for shard, local, lo, hi in groups:
                self._take(shard, spec, local, out=out.numpy()[lo:hi])
            return out
        rows = np.concatenate([self._take(shard, spec, local, numpy=True) for shard, local, _, _ in groups])
        rows.take(inverse, axis=0, out=out.numpy(), mode="clip")
        return out

    def _gather_ragged(
        self, spec: _Spec, groups: list[_Group], order: np.ndarray | None, size: int, pin: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.empty(size, dtype=np.int64)
        lengths_sorted = np.empty(size, dtype=np.int64)
        for shard, local, lo, hi in groups:
            self._read_offsets(self._map(shard, f"{spec.key}.offsets"), local, starts[lo:hi], lengths_sorted[lo:hi])
        rows = np.arange(size) if order is None else order  # output row of each sorted row
        lengths = _empty((size,), np.dtype(np.int64), pin)
        lengths.numpy()[rows] = lengths_sorted
        longest = int(lengths_sorted.max()) if size else 0
        padded = _empty((size, longest, *spec.shape), spec.dtype, pin)
        padded.fill_(self.pad_value)
        for shard, _, lo, hi in groups:
            group_lengths = lengths_sorted[lo:hi]
            ends = np.cumsum(group_lengths)
            row = np.repeat(rows[lo:hi], group_lengths)
            column = np.arange(int(ends[-1])) - np.repeat(ends - group_lengths, group_lengths)
            source = np.repeat(starts[lo:hi], group_lengths) + column
            values = self._map(shard, spec.key)

            def read(part: slice, row=row, column=column, source=source, values=values, ends=ends) -> None:
                first, stop, _ = part.indices(len(ends))
                flat = slice(int(ends[first - 1]) if first else 0, int(ends[stop - 1]) if stop else 0)
                padded.numpy()[row[flat], column[flat]] = values.array[source[flat]]

            row_bytes = self._row_bytes[spec.key]
            first = values.header_bytes + starts[lo:hi] * row_bytes
            self._read(values, first, first + np.maximum(group_lengths * row_bytes - 1, 0), read)
        return padded, lengths

    def _read_offsets(self, offsets: _MappedArray, local: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Where samples ``local`` of one shard start in its values, and their lengths."""

        def read(part: slice) -> None:
            starts[part] = offsets.array[local[part]]
            lengths[part] = offsets.array[local[part] + 1] - starts[part]

        first = offsets.header_bytes + local * 8
        self._read(offsets, first, first + 15, read)

    def _stored_batches(self) -> Iterator[tuple | dict]:
        """The stored columns, shard by shard (variable-length arrays kept variable-length)."""
        for shard in range(len(self.shard_sizes)):
            columns: list[np.ndarray | _Ragged] = []
            for spec in self.specs:
                values = self._map(shard, spec.key).array.copy()
                if spec.ragged:
                    columns.append(_Ragged(values, self._map(shard, f"{spec.key}.offsets").array.copy()))
                else:
                    columns.append(values)
            self.close()
            keys = [s.key for s in self.specs]
            yield dict(zip(keys, columns)) if self.manifest["names"] is not None else tuple(columns)


_STATM: tuple[int, int] | None = None  # (pid, fd) of this process's /proc/self/statm


def _mapped_file_bytes() -> int | None:
    """Resident bytes of this process's shared (file-backed) mappings, or ``None`` off Linux."""
    global _STATM
    try:
        if _STATM is None or _STATM[0] != os.getpid():  # a forked child must open its own
            _STATM = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_STATM[1], 200, 0).split()[2]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return None


def _empty(shape: tuple[int, ...], dtype: np.dtype, pin: bool) -> torch.Tensor:
    """A fresh tensor; pinned ones come from PyTorch, the others from NumPy (cheaper for small batches)."""
    if pin:
        return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
    return torch.from_numpy(np.empty(shape, dtype))


def verify(path: str | os.PathLike, mode: str = "full") -> ShardSource:
    """Check a shard folder (``mode="full"``: every checksum; ``"open"``: sizes only).

    Returns the folder opened as a :class:`ShardSource`; raises :class:`ShardError` naming the
    first file that is missing, truncated or corrupt.
    """
    check_choice("mode", mode, ("open", "full"))
    return ShardSource(path, verify=mode)
