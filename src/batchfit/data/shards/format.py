"""The shard format: constants, per-array specs, checksums and the manifest.

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
import json
import math
import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ShardError, expected
from .schema import NAME, check_manifest

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
            if not isinstance(name, str) or not NAME.fullmatch(name):
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
# Reading


def _manifest_error(path: Path, problem: str) -> ShardError:
    return ShardError(f"Shard manifest {path} {problem}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when it has a key twice (``json`` would keep the last silently)."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"the key {key!r} appears twice in one object")
        found[key] = value
    return found


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed and checked ``manifest.json`` of a shard folder; raises :class:`ShardError`.

    Every field is checked against the schema (``schema.py``), so a damaged or hand-edited
    manifest is refused naming the field, never used half-way.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise ShardError(f"{folder} is a file, not a shard folder: write one with bf.write_shards or "
                         f"`batchfit shards write {folder} OUT`")
    if not folder.is_dir():
        raise ShardError(f"Shard folder {folder} does not exist (an interrupted write leaves none)")
    if not path.is_file():
        raise ShardError(f"Shard manifest {path} is missing: {folder} is not a complete shard folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError, ...
        raise _manifest_error(path, f"cannot be read as JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _manifest_error(path, f"is not a {FORMAT!r} manifest (expected format={FORMAT!r})")
    version = manifest.get("version")
    if type(version) is not int or version != VERSION:  # True == 1 and 1.0 == 1, but neither is version 1
        raise _manifest_error(path, f"has format version {version!r}; this batchfit reads version {VERSION}")
    check_manifest(path, manifest)
    return manifest


def _file_problem(path: Path, entry: dict[str, Any], full: bool) -> str | None:
    """What is wrong with one shard file (outside the folder, missing, not a file, wrong size,
    wrong checksum), or ``None``. ``path`` is the folder joined with the entry's plain name."""
    folder, target = os.path.realpath(path.parent), os.path.realpath(path)
    if os.path.commonpath([folder, target]) != folder:
        return f"is a symbolic link to {target}, outside the shard folder {folder}"
    try:
        status = path.stat()
    except FileNotFoundError:
        return "is missing"
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    if not stat.S_ISREG(status.st_mode):
        return f"is not a regular file ({_file_kind(status.st_mode)})"
    if status.st_size != entry["bytes"]:
        return f"has {status.st_size} bytes, but the manifest says {entry['bytes']} (truncated or overwritten)"
    if full:
        try:
            found = _hash_file(path)
        except OSError as error:
            return f"cannot be read: {error.strerror}"
        wanted = entry["blake2b"]
        if found != wanted:
            return f"is corrupt: its blake2b checksum is {found[:16]}..., the manifest says {wanted[:16]}..."
    return None


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    return next((kind for test, kind in kinds.items() if test(mode)), "not a plain file")


def check_files(folder: Path, manifest: dict[str, Any], full: bool) -> None:
    """Check every file a manifest lists (see :func:`_file_problem`); two entries that are the
    same file (a link to another) are refused too. Raises :class:`ShardError` naming the file."""
    seen: dict[tuple[int, int], Path] = {}
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            path = folder / entry["name"]
            problem = _file_problem(path, entry, full)
            if problem is not None:
                raise ShardError(f"Shard file {path} {problem}")
            status = path.stat()
            first = seen.setdefault((status.st_dev, status.st_ino), path)
            if first != path:
                raise ShardError(f"Shard file {path} is the same file as {first} (a link to it); "
                                 "every file the manifest lists must be a file of its own")


def _hash_file(path: Path) -> str:
    digest, buffer = hashlib.blake2b(), bytearray(4 * 2**20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def read_npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of an .npy stream, leaving it at the first data byte.

    Raises ``ValueError`` when the stream does not start with a valid .npy header.
    """
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = read(stream)
    except RecursionError:  # a hostile header nested too deep for the literal parser
        raise ValueError("the header is nested too deeply to parse") from None
    return tuple(shape), fortran, dtype


def map_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[mmap.mmap, int]:
    """Memory-map one shard file read-only, after checking its .npy header against the manifest.

    ``dtype`` and ``shape`` are what the manifest says the file holds. The header's ``descr``,
    ``fortran_order`` and ``shape`` must be those, and the file must be exactly the header plus
    that data, so every byte the map serves is inside the file. Returns ``(map, header_bytes)``.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; the map keeps its own descriptor)
    except OSError as error:
        raise ShardError(f"Shard file {path} cannot be opened: {error.strerror}") from None
    with f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise ShardError(f"Shard file {path} is not a regular file ({_file_kind(status.st_mode)})")
        try:
            found_shape, fortran, found_dtype = read_npy_header(f)
        except ValueError as error:
            raise ShardError(f"Shard file {path} has no valid .npy header: {error}") from None
        problem = _header_problem(found_dtype, fortran, found_shape, dtype, shape)
        if problem is not None:
            raise ShardError(f"Shard file {path} {problem}")
        header_bytes = f.tell()
        data_bytes = math.prod(shape) * dtype.itemsize
        if status.st_size != header_bytes + data_bytes:
            raise ShardError(
                f"Shard file {path} holds {status.st_size - header_bytes} bytes after its .npy header, but the "
                f"header's `shape` {shape} of {dtype} needs {data_bytes} (the file was cut or padded)"
            )
        return mmap.mmap(f.fileno(), status.st_size, access=mmap.ACCESS_READ), header_bytes


def _header_problem(
    found_dtype: np.dtype, fortran: bool, found_shape: tuple[int, ...], dtype: np.dtype, shape: tuple[int, ...]
) -> str | None:
    """How an .npy header differs from what the manifest says, or ``None``."""
    if found_dtype != dtype:
        return (f"holds dtype {found_dtype} (`descr` {found_dtype.str!r} in its .npy header); "
                f"the manifest says dtype {dtype} ({dtype.str!r})")
    if fortran is not False:
        return f"is in Fortran order (`fortran_order` {fortran!r} in its .npy header); shard files are in C order"
    if found_shape != shape:
        return (f"holds shape {found_shape} (`shape` in its .npy header); the manifest says {shape} "
                "(the shard's `samples`, then the array's per-sample `shape`)")
    return None


def map_size_problem(mapped: mmap.mmap) -> str | None:
    """Whether the file under a map no longer has the size it was mapped with (one ``fstat``)."""
    try:
        size = mapped.size()
    except (OSError, ValueError) as error:  # ValueError: the map was closed
        return f"cannot be checked: {error}"
    if size != len(mapped):
        return (f"has {size} bytes, but it was mapped with {len(mapped)} (the manifest's size): it was truncated "
                "or rewritten while open, and reading the missing pages would kill the process (SIGBUS)")
    return None
