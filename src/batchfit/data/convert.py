"""Turning files into shard folders: what ``batchfit shards write IN OUT`` runs.

Inputs are read piece by piece, so they may be larger than memory:

- ``.npy``: one array (tuple batches ``(x,)``); with ``target=COLUMN`` a 2-D array is split
  into features and that column, giving ``(x, y)``.
- ``.npz``: its arrays by name (dict batches); with ``target=NAME``, tuple batches of the
  other arrays followed by that one.
- ``.csv`` / ``.tsv``: numbers, with or without a header line; ``target`` (a column name or
  index, default the last column) becomes ``y``, the other columns ``x`` (float32). ``y`` is
  int64 when the first rows hold whole numbers (class labels), else float32.
- a folder with one sub-folder per class: images decoded with Pillow to ``uint8`` arrays of
  shape ``(channels, height, width)`` (grayscale when every image is, else RGB), with
  ``int64`` labels in the sorted order of the class names, which the manifest keeps; or, with
  ``encoded=True``, each file's encoded bytes (see :mod:`batchfit.data.images`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import InputError, expected
from .images.folder import write_image_shards
from .shards import CHUNK_BYTES, ShardSource, verify, write_shards
from .shards.format import read_npy_header

IMAGE_BATCH = 256
CSV_LINES = 65536


def convert(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    target: str | int | None = None,
    image_size: int | tuple[int, int] | None = None,
    shard_size: int | None = None,
    *,
    overwrite: bool = False,
    encoded: bool = False,
    max_side: int | None = None,
    on_corrupt: str = "error",
    workers: int | None = None,
    progress: bool = False,
    mode: str | None = None,
    follow_symlinks: bool = False,
) -> ShardSource:
    """Write the ``.npy``/``.npz``/``.csv``/``.tsv`` file or image folder ``in_path`` as shards.

    ``target`` picks the target array or column (see the module docstring); ``image_size``
    (``int`` or ``(height, width)``) resizes images, which must otherwise all have the size of
    the first one. An image folder is stored decoded, or with ``encoded=True`` as each file's
    bytes (re-encoded past ``max_side``); ``on_corrupt``, ``workers``, ``progress``, ``mode`` and
    ``follow_symlinks`` are those
    of :func:`~batchfit.data.images.write_image_shards`. Returns the new folder opened as a
    :class:`ShardSource`.
    """
    in_path = Path(in_path)
    if not in_path.exists():
        raise expected("in_path", "an existing file or folder", str(in_path))
    suffix = in_path.suffix.lower()
    if image_size is not None and not in_path.is_dir():
        raise expected("image_size", "None unless in_path is an image folder", image_size)
    if encoded and image_size is not None:
        raise expected("image_size", "None for encoded images (they keep their sizes; see max_side)", image_size)
    metadata: dict[str, Any] = {"converted_from": in_path.name}
    if in_path.is_dir():
        if target is not None:
            raise expected("target", "None for an image folder (labels come from sub-folders)", target)
        return write_image_shards(in_path, out_path, decode=not encoded, image_size=image_size, max_side=max_side,
                                  on_corrupt=on_corrupt, workers=workers, progress=progress, shard_size=shard_size,
                                  overwrite=overwrite, mode=mode, follow_symlinks=follow_symlinks)
    batches: Iterator[Any]
    if suffix == ".npy":
        batches = _npy_batches(in_path, target)
    elif suffix == ".npz":
        batches = _npz_batches(in_path, target)
    elif suffix in (".csv", ".tsv"):
        batches = _csv_batches(in_path, target, "\t" if suffix == ".tsv" else ",")
    else:
        what = "a .npy, .npz, .csv or .tsv file, or a folder with one sub-folder of images per class"
        raise expected("in_path", what, str(in_path))
    return write_shards(out_path, batches, shard_size=shard_size, overwrite=overwrite, metadata=metadata)


def verify_path(path: str | os.PathLike, mode: str = "full") -> str:
    """Check a shard folder (every checksum with ``mode="full"``) and describe it.

    Raises :class:`~batchfit.ShardError` naming the first damaged file.
    """
    source = verify(path, mode)
    files = sum(len(s["files"]) for s in source.manifest["shards"])
    checked = "sizes and checksums" if mode == "full" else "sizes"
    return f"{source.summary()}\nok: the {checked} of all {files} files match the manifest"


# --- .npy and .npz --------------------------------------------------------------------------


class _NpyReader:
    """Reads an .npy stream (a file or a zip member) a block of rows at a time."""

    def __init__(self, stream: IO[bytes], where: str) -> None:
        self.stream, self.where = stream, where
        try:
            shape, fortran, dtype = read_npy_header(stream)
        except ValueError as error:
            raise InputError(f"{where} is not a readable .npy array: {error}") from None
        if dtype.hasobject or fortran or not shape:
            got = "object dtype" if dtype.hasobject else "Fortran order" if fortran else "a 0-d array"
            raise expected(where, "a C-ordered numeric array with a sample dimension", got)
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: int) -> np.ndarray:
        data = self.stream.read(rows * self.row_bytes)
        if len(data) != rows * self.row_bytes:
            raise InputError(f"{self.where} ends early: expected {len(self)} rows of {self.row_bytes} bytes")
        return np.frombuffer(data, dtype=self.dtype).reshape(rows, *self.shape[1:])


def _read_in_step(readers: list[_NpyReader]) -> Iterator[list[np.ndarray]]:
    """Blocks of the same rows of every reader, about ``CHUNK_BYTES`` at a time."""
    chunk = max(1, CHUNK_BYTES // max(1, sum(r.row_bytes for r in readers)))
    for lo in range(0, len(readers[0]), chunk):
        rows = min(chunk, len(readers[0]) - lo)
        yield [r.read(rows) for r in readers]


def _column_index(target: str | int, columns: int, where: str, header: list[str] | None = None) -> int:
    if header is not None and target in header:
        return header.index(str(target))
    try:
        index = int(target)
    except (TypeError, ValueError):
        names = f"one of {header}" if header else "a column index"
        raise expected("target", f"{names} of {where}", target) from None
    if not -columns <= index < columns:
        raise expected("target", f"a column index of {where} in [{-columns}, {columns})", target)
    return index % columns


def _npy_batches(path: Path, target: str | int | None) -> Iterator[tuple[np.ndarray, ...]]:
    with open(path, "rb") as f:
        reader = _NpyReader(f, str(path))
        if target is None:
            for (block,) in _read_in_step([reader]):
                yield (block,)
            return
        if len(reader.shape) != 2:
            raise expected("target", f"None for the {len(reader.shape)}-d array in {path}", target)
        column = _column_index(target, reader.shape[1], str(path))
        keep = np.arange(reader.shape[1]) != column
        for (block,) in _read_in_step([reader]):
            yield block[:, keep], block[:, column]


def _npz_batches(path: Path, target: str | int | None) -> Iterator[Any]:
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".npy")]
        names = [m[: -len(".npy")] for m in members]
        if not members:
            raise expected("in_path", "an .npz file with at least one array", f"{path}, which has none")
        if target is not None and str(target) not in names:
            raise expected("target", f"one of the arrays {names} of {path}", target)
        streams = [archive.open(m) for m in members]
        readers = [_NpyReader(s, f"{path}[{n}]") for s, n in zip(streams, names)]
        lengths = {n: len(r) for n, r in zip(names, readers)}
        if len(set(lengths.values())) > 1:
            raise InputError(f"The arrays of {path} must have the same number of samples. Received: {lengths}")
        for blocks in _read_in_step(readers):
            if target is None:
                yield dict(zip(names, blocks))
            else:
                at = names.index(str(target))
                yield (*blocks[:at], *blocks[at + 1 :], blocks[at])


# --- .csv ---------------------------------------------------------------------------------------


def _csv_batches(path: Path, target: str | int | None, delimiter: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    try:
        yield from _csv_rows(path, target, delimiter)
    except UnicodeDecodeError as error:
        from .text import first_bad_line

        line, raw = first_bad_line(path)
        raise InputError(f"{path}" + (f", line {line}" if line else "") + f" is not UTF-8 text ({error.reason} "
                            f"near {raw[:60]!r}): save the file as UTF-8") from None


def _csv_rows(path: Path, target: str | int | None, delimiter: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline()
        fields = [field.strip().strip('"') for field in first.rstrip("\r\n").split(delimiter)]
        header = None if all(_is_number(field) for field in fields) else fields
        column = _column_index(len(fields) - 1 if target is None else target, len(fields), str(path), header)
        keep = np.arange(len(fields)) != column
        line, lines = 2 if header else 1, [] if header else [first]
        integral = None
        while True:
            lines.extend(_take_lines(f, CSV_LINES - len(lines)))
            if not lines:
                return
            rows = _parse_csv(lines, delimiter, len(fields), path, line)
            labels = rows[:, column]
            whole = bool(np.all(labels == np.round(labels)))
            integral = whole if integral is None else integral
            if integral and not whole:
                bad = line + int(np.flatnonzero(labels != np.round(labels))[0])
                raise InputError(
                    f"{path}, line {bad}: the target column held whole numbers (class labels) so far, "
                    f"but this line holds {labels[bad - line]}"
                )
            yield rows[:, keep].astype(np.float32), labels.astype(np.int64 if integral else np.float32)
            line, lines = line + len(lines), []


def _take_lines(f: IO[str], count: int) -> list[str]:
    lines = []
    for text in f:
        if text.strip():
            lines.append(text)
            if len(lines) == count:
                break
    return lines


def _parse_csv(lines: list[str], delimiter: str, columns: int, path: Path, line: int) -> np.ndarray:
    try:
        rows = np.loadtxt(lines, delimiter=delimiter, dtype=np.float64, ndmin=2, quotechar='"')
    except ValueError as error:
        hint = ""
        if "could not convert" in str(error):
            hint = (" (shards write reads a .csv as numbers; for a .csv of texts give --tokenizer and "
                    "--text-column/--label-column, see docs/text.md)")
        raise InputError(f"{path}, lines {line}-{line + len(lines) - 1}: {error}{hint}") from None
    if rows.shape[1] != columns:
        raise expected(f"{path}, lines {line}-{line + len(lines) - 1}", f"{columns} columns", rows.shape[1])
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
