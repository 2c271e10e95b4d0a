"""The schema of ``manifest.json``: every field's type and range, checked before anything uses it.

A manifest is written by :func:`write_shards`, but it is a text file a person can edit or a
disk can damage. :func:`check_manifest` holds it to what the writer writes, so that a bad field
is a :class:`ShardError` naming the manifest, the field (``shards[2].files['0'].bytes``), what
was expected and what was received, instead of a ``KeyError`` or ``TypeError`` from deep inside
the reader. The checks that need the files themselves (sizes, checksums, .npy headers) are in
``format.py``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ShardError

NAME = re.compile(r"[A-Za-z0-9_-]+")  # array names (and the keys of tuple sources: "0", "1", ...)
_HEX_DIGEST = re.compile(r"[0-9a-f]{128}")  # BLAKE2b, 64 bytes
_INT_MAX = 2**63 - 1  # sizes and counts are int64 in NumPy and PyTorch
_MAX_DIMS = 31  # per sample; with the sample dimension, within NumPy's limit on every version


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class _Manifest:
    """Checks one parsed manifest; every refusal names ``path`` and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def refuse(self, field: str, what: str, received: Any) -> ShardError:
        return ShardError(
            f"Shard manifest {self.path} is malformed: `{field}` must be {what}. Received: {_shown(received)}"
        )

    def need(self, parent: Any, key: str | int, field: str, what: str) -> Any:
        if isinstance(key, str) and key not in parent:
            raise ShardError(f"Shard manifest {self.path} is malformed: `{field}` is missing (expected {what})")
        return parent[key]

    def object_at(self, parent: Any, key: str | int, field: str) -> dict[str, Any]:
        value = self.need(parent, key, field, "an object")
        if not isinstance(value, dict):
            raise self.refuse(field, "an object", value)
        return value

    def list_at(self, parent: Any, key: str, field: str) -> list[Any]:
        value = self.need(parent, key, field, "a non-empty list")
        if not isinstance(value, list) or not value:
            raise self.refuse(field, "a non-empty list", value)
        return value

    def int_at(self, parent: Any, key: str | int, field: str, low: int, high: int = _INT_MAX) -> int:
        what = f"an integer from {low} to {'2**63 - 1' if high == _INT_MAX else high}"
        value = self.need(parent, key, field, what)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.refuse(field, what, value)
        return value

    def str_at(self, parent: Any, key: str, field: str, pattern: re.Pattern[str], what: str) -> str:
        value = self.need(parent, key, field, what)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise self.refuse(field, what, value)
        return value


def check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Check a parsed manifest (``format`` and ``version`` already checked) against the schema.

    Raises :class:`ShardError` naming ``path`` and the first field that is not as
    :func:`write_shards` writes it: a missing field, a wrong type, a number out of range, an
    unknown or unusable dtype, a file name that is not a plain name inside the folder, a file
    named twice, sample counts that do not add up or sizes too small for them.
    """
    check = _Manifest(path)
    num_samples = check.int_at(manifest, "num_samples", "num_samples", 1)
    arrays = check.list_at(manifest, "arrays", "arrays")
    specs = [_array(check, arrays, i) for i in range(len(arrays))]
    keys = [key for key, _, _, _ in specs]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise check.refuse(f"arrays[{i}].key", f"a key no other array has ({keys[: i]} are taken)", key)
    _names(check, manifest, keys, [ragged for _, _, _, ragged in specs])
    _pad_value(check, manifest, specs)
    shards = check.list_at(manifest, "shards", "shards")
    seen: dict[str, str] = {}  # file name -> the field that names it first
    for i in range(len(shards)):
        _shard(check, shards, i, specs, seen)
    total = sum(shard["samples"] for shard in shards)
    if total != num_samples:
        raise check.refuse("num_samples", f"the sum of the shards' `samples` ({total})", num_samples)
    if "metadata" in manifest:
        check.object_at(manifest, "metadata", "metadata")


_Array = tuple[str, np.dtype, tuple[int, ...], bool]  # key, dtype, per-sample shape, ragged


def _array(check: _Manifest, arrays: list[Any], i: int) -> _Array:
    field = f"arrays[{i}]"
    entry = check.object_at(arrays, i, field)
    key = check.str_at(entry, "key", f"{field}.key", NAME, "a name of letters, digits, '_' or '-'")
    dtype = _dtype(check, entry, f"{field}.dtype")
    what = f"a list of at most {_MAX_DIMS} non-negative integers (the per-sample shape)"
    shape = check.need(entry, "shape", f"{field}.shape", what)
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise check.refuse(f"{field}.shape", what, shape)
    for d in range(len(shape)):
        check.int_at(shape, d, f"{field}.shape[{d}]", 0)
    if dtype.itemsize * math.prod(shape) > _INT_MAX:
        raise check.refuse(f"{field}.shape", f"a shape whose samples hold fewer than 2**63 bytes of {dtype}", shape)
    ragged = check.need(entry, "ragged", f"{field}.ragged", "true or false")
    if not isinstance(ragged, bool):
        raise check.refuse(f"{field}.ragged", "true or false", ragged)
    return key, dtype, tuple(shape), ragged


def _dtype(check: _Manifest, entry: dict[str, Any], field: str) -> np.dtype:
    what = f"a numeric NumPy dtype in this machine's byte order that PyTorch supports, like {np.dtype('f4').str!r}"
    value = check.need(entry, "dtype", field, what)
    if not isinstance(value, str):
        raise check.refuse(field, what, value)
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError, SyntaxError):
        raise check.refuse(field, what, value) from None
    if dtype.kind not in "biufc" or dtype.byteorder not in "=|" or dtype.fields is not None or dtype.subdtype:
        raise check.refuse(field, what, value)
    try:
        torch.from_numpy(np.zeros(1, dtype))
    except (TypeError, ValueError):
        raise check.refuse(field, what, value) from None
    return dtype


def _names(check: _Manifest, manifest: dict[str, Any], keys: list[str], ragged: list[bool]) -> None:
    positions = [str(i) for i in range(len(keys))]
    if keys == positions:  # a tuple source, or named "0", "1", ...
        what = f"null (a tuple source) or the arrays' keys in order, {keys}"
    else:
        what = f"the arrays' keys in order, {keys} (null is for tuple sources, whose keys are {positions})"
    names = check.need(manifest, "names", "names", what)
    if names != keys and (names is not None or keys != positions):
        raise check.refuse("names", what, names)
    if names is not None:  # named batches get `<name>_lengths` beside each ragged array
        for key, is_ragged in zip(keys, ragged):
            if is_ragged and f"{key}_lengths" in keys:
                raise check.refuse("names", f"no array named {key}_lengths beside ragged {key!r}", names)


def _pad_value(check: _Manifest, manifest: dict[str, Any], specs: list[_Array]) -> None:
    what = "a number"
    value = check.need(manifest, "pad_value", "pad_value", what)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise check.refuse("pad_value", what, value)
    for key, dtype, _, ragged in specs:
        if ragged and pad_problem(value, dtype):
            raise check.refuse("pad_value", f"a number that fits dtype {dtype} (it pads array {key!r})", value)


def pad_problem(value: float, dtype: np.dtype) -> bool:
    """Whether ``value`` cannot pad a tensor of ``dtype`` (too large for it, or NaN for integers)."""
    try:
        torch.full((1,), value, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    except (RuntimeError, OverflowError):
        return True
    return False


def _shard(check: _Manifest, shards: list[Any], i: int, specs: list[_Array], seen: dict[str, str]) -> None:
    field = f"shards[{i}]"
    shard = check.object_at(shards, i, field)
    samples = check.int_at(shard, "samples", f"{field}.samples", 1)
    files = check.object_at(shard, "files", f"{field}.files")
    wanted = [key for key, _, _, _ in specs] + [f"{key}.offsets" for key, _, _, ragged in specs if ragged]
    if sorted(files) != sorted(wanted):
        what = f"an object with one entry per stored file, {sorted(wanted)}"
        raise check.refuse(f"{field}.files", what, sorted(files))
    least = {key: samples * dtype.itemsize * math.prod(shape) for key, dtype, shape, ragged in specs if not ragged}
    least.update({f"{key}.offsets": (samples + 1) * 8 for key, _, _, ragged in specs if ragged})
    for part in wanted:
        where = f"{field}.files[{part!r}]"
        entry = check.object_at(files, part, where)
        name = _file_name(check, entry, f"{where}.name")
        if name in seen:
            raise check.refuse(f"{where}.name", f"a file no other entry names (`{seen[name]}` names it)", name)
        seen[name] = f"{where}.name"
        size = check.int_at(entry, "bytes", f"{where}.bytes", 0)
        if size < least.get(part, 0):
            what = f"at least {least[part]} for {samples} samples (`{field}.samples`)"
            raise check.refuse(f"{where}.bytes", what, size)
        check.str_at(entry, "blake2b", f"{where}.blake2b", _HEX_DIGEST, "128 lowercase hex digits (a BLAKE2b digest)")


def _file_name(check: _Manifest, entry: dict[str, Any], field: str) -> str:
    what = f"the name of a file in the shard folder (no '/', not hidden, not {check.path.name!r})"
    name = check.need(entry, "name", field, what)
    if (
        not isinstance(name, str)
        or not name
        or Path(name).name != name
        or "/" in name
        or "\0" in name
        or name.startswith(".")
        or name == check.path.name
    ):
        raise check.refuse(field, what, name)
    return name
