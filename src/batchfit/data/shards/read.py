"""Reading a shard folder: ShardSource, memory maps with a bounded resident set, verify."""
from __future__ import annotations

import itertools
import math
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ShardError, check_choice, check_positive_int, expected
from ..sources import Batch, pack, slice_batch
from . import runs
from .format import (
    _FAULT_BYTES,
    MAPPED_BYTES,
    VERIFY_MODES,
    _file_problem,
    _output_names,
    _Ragged,
    _Spec,
    check_files,
    map_npy,
    map_size_problem,
    read_manifest,
)
from .span import Span, shard_finder

# A Batcher joins small batches into gathers of about this many bytes: a gather's Python calls
# (tens of us) are then shared by its batches, and its output still fits the CPU's caches. On
# 200,000 x 64 float32, batch 256 (1, 13 and 98 shards), 1-2 MiB measured fastest of 0.5-4 MiB.
JOIN_BYTES = 2 * 2**20
# Past the mapping limit, a gather whose rows are sparse in the file (fewer than this many rows
# per page fault reading them through the map would take: a uniform shuffle) is read by pread,
# in runs, mapping nothing.
# Through the map each such row faults in a large folio (about 100 KiB measured on Linux 6.18,
# up to 2 MiB), so the maps fill the limit after a few batches and are dropped (1-3 ms each);
# a pread costs one system call per run instead (2-3 us). See shards/runs.py.
PREADS_PER_FAULT = 2
_OPEN_LOCK = threading.Lock()


class _MappedArray:
    """One .npy shard file, memory-mapped read-only, whose resident pages can be dropped."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self._map, header_bytes = map_npy(path, dtype, shape)  # the header checked against the manifest
        count = math.prod(shape)
        array = np.frombuffer(self._map, dtype, count, header_bytes) if count else np.empty(0, dtype)
        self.array = array.reshape(shape)
        self.path = path
        self.header_bytes = header_bytes
        self._fd: int | None = None  # for pread, opened on first use
        self.cold = False  # whether preads have been waiting for the disk
        self.seen = np.zeros(len(self._map) // _FAULT_BYTES + 1, dtype=bool)  # regions read since the last drop

    def mark(self, first: np.ndarray, last: np.ndarray) -> int:
        """Mark the regions holding bytes ``first[i]..last[i]`` as read; return how many are new."""
        if len(first) and int((last - first).max()) >= _FAULT_BYTES:  # rows spanning 3+ regions
            return len(first) * (int((last - first).max()) // _FAULT_BYTES + 2)
        before = int(np.count_nonzero(self.seen))
        self.seen[first // _FAULT_BYTES] = True
        self.seen[last // _FAULT_BYTES] = True
        return int(np.count_nonzero(self.seen)) - before

    def new_faults(self, first: np.ndarray) -> int:
        """About how many page faults reading the bytes at ``first`` through the map would take:
        the distinct :data:`runs.READ_AROUND` windows holding them in regions not read since the
        last drop (a fault maps the file's cached pages around itself, so rows of one window
        share it)."""
        touched = np.zeros(len(self._map) // runs.READ_AROUND + 1, dtype=bool)
        touched[first // runs.READ_AROUND] = True
        windows = np.flatnonzero(touched)
        return int(np.count_nonzero(~self.seen[windows // (_FAULT_BYTES // runs.READ_AROUND)]))

    def read_runs(self, plan: runs.Runs, out: np.ndarray) -> None:
        """Rows of ``plan`` into ``out`` by pread; on a cold page cache the kernel is told first."""
        fd = self.fileno()
        if self.cold:
            runs.will_need(fd, plan)
        start = time.perf_counter()
        runs.read_runs(fd, plan, out, self.path)
        per_run = (time.perf_counter() - start) / max(1, len(plan.offsets))
        self.cold = per_run > runs.COLD_SECONDS if not self.cold else per_run > runs.WARM_SECONDS

    def fileno(self) -> int:
        """A descriptor of the file for ``pread`` (opened once, closed with this object)."""
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            with _OPEN_LOCK:
                if self._fd is None:
                    self._fd = fd
                    weakref.finalize(self, os.close, fd)
                    return fd
            os.close(fd)
        return self._fd

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

    Files must not change while they are open. Symbolic links that leave the folder and two
    entries naming one file are refused. A file cut shorter after it was mapped cannot be
    caught on Linux: reading a page past its new end raises SIGBUS, which kills the process
    (exit status 135, no message) and cannot be turned into an exception in CPython.
    :meth:`check_sizes` (one ``fstat`` per mapped file; the Batcher calls it at each epoch start)
    raises a :class:`ShardError` naming such a file before it is read; every file is also
    checked against the manifest whenever it is mapped (again).
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
        # Whether every array is gathered by one take, and the views over all shards that do it
        # (None: not known yet). One attribute, replaced whole: a reader in another thread sees both.
        self._direct: tuple[bool, dict[str, Span]] | None = None
        self._shard_of = shard_finder(self.shard_sizes)

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``metadata`` given to :func:`write_shards` (e.g. class names of an image folder)."""
        return self.manifest.get("metadata", {})

    @property
    def classes(self) -> list[str] | None:
        """The class names of the labels (an image folder's subfolders), index = label; ``None`` if unknown."""
        classes = self.metadata.get("classes")
        return list(classes) if isinstance(classes, list) else None

    def __len__(self) -> int:
        return self._len

    def lengths(self) -> np.ndarray | None:
        """Each sample's length, the longest of its variable-length arrays (from the stored offsets,
        8 bytes a sample); ``None`` when every array has a fixed shape."""
        ragged = [spec for spec in self.specs if spec.ragged]
        if not ragged:
            return None
        parts = []
        for shard in range(len(self.shard_sizes)):
            per_array = [np.diff(self._map(shard, f"{spec.key}.offsets").array) for spec in ragged]
            parts.append(np.maximum.reduce(per_array).astype(np.int64))
        return np.concatenate(parts)

    def __repr__(self) -> str:
        return f"ShardSource({str(self.path)!r}, samples={self._len}, shards={len(self.shard_sizes)})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"], state["_maps"], state["_direct"], state["_shard_of"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._maps, self._resident, self._direct = threading.RLock(), {}, 0, None
        self._shard_of = shard_finder(self.shard_sizes)
        self._baseline = _mapped_file_bytes()

    def verify(self, full: bool = True) -> None:
        """Check every shard file's size against the manifest, and its checksum when ``full``."""
        check_files(self.path, self.manifest, full)

    def check_sizes(self) -> None:
        """Check that every file mapped so far still has the size it was mapped with.

        Cheap (one ``fstat`` per mapped file), so a reader can call it at each epoch start: a
        file truncated in place while mapped is named in a :class:`ShardError` here, where
        reading its lost pages would kill the process with SIGBUS.
        """
        with self._lock:
            maps = list(self._maps.items())
        for (shard, part), mapped in maps:
            problem = map_size_problem(mapped._map)
            if problem is not None:
                name = self.manifest["shards"][shard]["files"][part]["name"]
                raise ShardError(f"Shard file {self.path / name} {problem}")

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
            self._direct = None
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
            offsets = _MappedArray(path, np.dtype(np.int64), (count + 1,))
            values = self.manifest["shards"][shard]["files"].get(part[: -len(".offsets")], {})
            _check_offsets(offsets.array, path, values.get("bytes"))
            return offsets
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

    def batches_per_gather(self, batch_size: int) -> int:
        """How many batches of ``batch_size`` a :class:`~batchfit.Batcher` should gather in one call.

        A gather costs some Python calls whatever its size (one per array while every map fits
        the bound, one per array and shard touched past it); small batches gathered together, up
        to :data:`JOIN_BYTES`, share them and are served as views. Only for dense arrays
        (variable-length ones are padded per batch).
        """
        if self._any_ragged:
            return 1
        return max(1, JOIN_BYTES // (max(1, sum(self._row_bytes.values())) * batch_size))

    def gather(self, indices: np.ndarray | torch.Tensor, pin_memory: bool = False) -> Batch:
        """The batch of the samples at ``indices`` (1-D integer array or tensor), in that order.

        While every map fits the bound, each array is gathered by one call whatever the number of
        shards (:class:`~batchfit.data.shards.span.Span`). Otherwise indices are sorted and
        grouped by shard; each shard is indexed once and the rows are put back into the
        requested order.
        """
        indices = self._check_indices(indices)
        direct, spans = self._direct or self._open_direct()
        if direct:
            taken = [_empty((len(indices), *spec.shape), spec.dtype, pin_memory) for spec in self.specs]
            self._take_dense(indices, [rows.numpy() for rows in taken], spans)
            return pack(self.names, taken)
        groups, order = self._groups(indices)
        if order is None and not pin_memory and groups and not self._any_ragged:  # the common case
            shard, local = groups[0][0], groups[0][1]
            return pack(self.names, [self._take(shard, spec, local) for spec in self.specs])
        inverse = _inverse(order)
        out: list[torch.Tensor] = []
        for position, spec in enumerate(self.specs):
            if spec.ragged:
                padded, lengths = self._gather_ragged(spec, groups, order, len(indices), pin_memory)
                target_last = position == len(self.specs) - 1 and position > 0 and self.names is None
                out.extend([lengths, padded] if target_last else [padded, lengths])
            else:
                out.append(self._gather_dense(spec, groups, inverse, len(indices), pin_memory, order))
        return pack(self.names, out)

    def read_rows(self, indices: np.ndarray | torch.Tensor, array: int | str = 0) -> list[np.ndarray]:
        """The rows at ``indices`` of one variable-length array, unpadded: a NumPy array each.

        ``array`` is the array's position (a tuple folder) or name (a named one). Each row is read
        whole with one ``pread``, past the memory maps, so the resident memory of a process
        reading them does not grow with the data; for rows read one by one (the encoded files of
        an image folder) rather than gathered into a padded batch (:meth:`gather`).
        """
        spec = self._spec(array)
        if not spec.ragged:
            raise expected("array", "a variable-length array of this folder", f"{array!r} ({spec.key}, fixed length)")
        indices = self._check_indices(indices)
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        row_bytes = spec.row_bytes()
        out = []
        for index, shard in zip(indices.tolist(), shards.tolist()):
            local = index - self._start_list[shard]
            offsets = self._map(shard, f"{spec.key}.offsets").array
            start, end = int(offsets[local]), int(offsets[local + 1])
            values = self._map(shard, spec.key)
            size = (end - start) * row_bytes
            data = os.pread(values.fileno(), size, values.header_bytes + start * row_bytes)
            if len(data) != size:
                raise ShardError(f"Shard file {values.path} ends early: sample {index} needs bytes up to "
                                 f"{values.header_bytes + end * row_bytes}")
            out.append(np.frombuffer(data, spec.dtype).reshape(end - start, *spec.shape))
        return out

    def take(self, indices: np.ndarray | torch.Tensor, array: int | str = 0) -> np.ndarray:
        """The rows at ``indices`` of one fixed-length array (position or name), as a NumPy array."""
        spec = self._spec(array)
        if spec.ragged:
            raise expected("array", "a fixed-length array of this folder (read_rows reads variable-length ones)",
                           f"{array!r} ({spec.key})")
        indices = self._check_indices(indices)
        groups, order = self._groups(indices)
        return self._gather_dense(spec, groups, _inverse(order), len(indices), False, order).numpy()

    def _spec(self, array: int | str) -> _Spec:
        """The stored array at position ``array`` (an int) or named ``array`` (a str)."""
        keys = [spec.key for spec in self.specs]
        if self.names is not None and isinstance(array, str) and array in keys:
            return self.specs[keys.index(array)]
        if isinstance(array, int) and not isinstance(array, bool) and 0 <= array < len(self.specs):
            return self.specs[array]
        stored = f" or a name in {keys}" if self.names is not None else ""
        raise expected("array", f"a stored array's position (0 to {len(self.specs) - 1}){stored}", array)

    def gather_batches(self, parts: list[np.ndarray], pin_memory: bool = False) -> list[Batch]:
        """The batches at each index array of ``parts``, gathered by one call and served as views of it.

        Python's cost per call is a good part of gathering a small batch; several batches
        gathered at once share it (see :meth:`batches_per_gather`).
        """
        indices = self._check_indices(np.concatenate(parts) if len(parts) > 1 else parts[0])
        bounds = [0, *itertools.accumulate(len(part) for part in parts)]
        direct, spans = self._direct or self._open_direct()
        if pin_memory or not direct:  # pinned memory, or shard by shard: tensors sliced
            whole = self.gather(indices, pin_memory)
            return [slice_batch(whole, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        columns = [np.empty((len(indices), *spec.shape), spec.dtype) for spec in self.specs]
        self._take_dense(indices, columns, spans)
        # NumPy slices made tensors cost a third of slicing the tensors themselves.
        from_numpy, names = torch.from_numpy, self.names
        return [pack(names, [from_numpy(c[lo:hi]) for c in columns]) for lo, hi in zip(bounds, bounds[1:])]

    def _take_dense(self, indices: np.ndarray, out: list[np.ndarray], spans: dict[str, Span]) -> None:
        """Every array's rows at ``indices`` (checked) into ``out``, while every map fits the bound:
        one ``take`` an array, from a single shard's map or from the span over all of them."""
        shard = self._shard_of(indices) if len(self.shard_sizes) > 1 else None
        for spec, rows in zip(self.specs, out):
            if rows.size == 0:
                continue
            if shard is None:
                mapped = self._maps.get((0, spec.key)) or self._map(0, spec.key)
                mapped.array.take(indices, axis=0, out=rows, mode="clip")
            else:
                span = spans[spec.key]
                span.take(span.rows(indices, shard), rows)

    def _open_direct(self) -> tuple[bool, dict[str, Span]]:
        """Whether every array can be gathered by one take (all dense, every map within the bound),
        and the spans over the shards that do it (none for one shard). A shard that does not open
        leaves the gathers to the shard-by-shard path, which names it when a batch needs it."""
        with self._lock:
            if self._direct is None:
                spans: dict[str, Span] = {}
                direct = self._fits and not self._any_ragged
                try:
                    if direct and len(self.shard_sizes) > 1:
                        for spec in self.specs:
                            arrays = [self._map(shard, spec.key).array for shard in range(len(self.shard_sizes))]
                            spans[spec.key] = Span(arrays, self._start_list)
                except ShardError:
                    direct, spans = False, {}
                self._direct = (direct, spans)
            return self._direct

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
        self, shard: int, spec: _Spec, local: np.ndarray, out: np.ndarray | None = None, numpy: bool = False,
        destinations: np.ndarray | None = None,
    ) -> Any:
        """Rows ``local`` of one shard's array: a tensor, or a NumPy array (``out`` when given).

        With ``destinations`` (past the mapping limit only), row ``local[i]`` goes to
        ``out[destinations[i]]`` instead of ``out[i]``.
        """
        mapped = self._maps.get((shard, spec.key)) or self._map(shard, spec.key)
        if self._fits:  # the common case, kept short
            rows = mapped.array.take(local, axis=0, out=out, mode="clip")
            return rows if numpy or out is not None else torch.from_numpy(rows)
        rows = np.empty((len(local), *spec.shape), spec.dtype) if out is None else out
        row_bytes = self._row_bytes[spec.key]
        first = mapped.header_bytes + local * row_bytes
        if runs.AVAILABLE and len(local) and mapped.new_faults(first) * PREADS_PER_FAULT > len(local):
            # Sparse rows (a uniform shuffle): pread them in file order, mapping nothing.
            mapped.read_runs(runs.plan_runs(local, mapped.header_bytes, row_bytes, destinations), rows)
            return rows if numpy or out is not None else torch.from_numpy(rows)
        if destinations is not None:
            rows[destinations] = self._take(shard, spec, local, numpy=True)
            return rows

        def read(part: slice) -> None:
            # mode="clip" skips NumPy's bounds-check buffering; _check_indices checked the bounds.
            mapped.array.take(local[part], axis=0, out=rows[part], mode="clip")

        self._read(mapped, first, first + max(0, row_bytes - 1), read)
        return rows if numpy or out is not None else torch.from_numpy(rows)

    def _gather_dense(
        self, spec: _Spec, groups: list[_Group], inverse: np.ndarray | None, size: int, pin: bool,
        order: np.ndarray | None = None,
    ) -> torch.Tensor:
        out = _empty((size, *spec.shape), spec.dtype, pin)
        if inverse is None:
            for shard, local, lo, hi in groups:
                self._take(shard, spec, local, out=out.numpy()[lo:hi])
            return out
        if not self._fits and order is not None:  # each group's rows straight to their places
            for shard, local, lo, hi in groups:
                self._take(shard, spec, local, out=out.numpy(), destinations=order[lo:hi])
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


def _inverse(order: np.ndarray | None) -> np.ndarray | None:
    """Where each row of a batch sorted by ``order`` comes from: row i of the output is row
    ``inverse[i]`` of the sorted batch (``None`` for a batch that was not reordered)."""
    if order is None:
        return None
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse


def _empty(shape: tuple[int, ...], dtype: np.dtype, pin: bool) -> torch.Tensor:
    """A fresh tensor; pinned ones come from PyTorch, the others from NumPy (cheaper for small batches)."""
    if pin:
        return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
    return torch.from_numpy(np.empty(shape, dtype))


def _check_offsets(offsets: np.ndarray, path: Path, value_bytes: Any) -> None:
    """Refuse sample offsets that no writer makes (tampered with, or damaged past the size check): they
    must start at 0, never decrease, and end within the values file. One pass when the file is mapped."""
    if len(offsets) == 0:
        return
    last = int(offsets[-1])
    bad = int(offsets[0]) != 0 or (len(offsets) > 1 and bool(np.any(np.diff(offsets) < 0)))
    if isinstance(value_bytes, int) and last > value_bytes:
        bad = True
    if bad:
        raise ShardError(f"Shard file {path} holds sample offsets that do not fit its values (they must start at 0, "
                         f"never decrease, and stay within the values file): the folder is damaged or was changed "
                         f"after it was written; write it again, or find the damage with verify='full'")


def verify(path: str | os.PathLike, mode: str = "full") -> ShardSource:
    """Check a shard folder (``mode="full"``: every checksum; ``"open"``: sizes only).

    Returns the folder opened as a :class:`ShardSource`; raises :class:`ShardError` naming the
    first file that is missing, truncated or corrupt.
    """
    check_choice("mode", mode, ("open", "full"))
    return ShardSource(path, verify=mode)

