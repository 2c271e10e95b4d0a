"""Sources hold samples and hand out whole batches of them.

A source is anything with ``len(src)`` (number of samples), ``src.names`` (``None`` for
tuple batches, a tuple of names for dict batches) and ``src.gather(indices)``, which returns
the batch for a 1-D ``int64`` NumPy array of sample indices as a tuple or dict of tensors.
Gathering is one vectorised indexing call per array, never one Python call per sample.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from ..core.batch import LENGTHS, Batch, slice_batch
from ..errors import InputError, expected

__all__ = ["ArraySource", "Batch", "DatasetSource", "Source", "as_source", "fingerprint", "pack", "slice_batch"]


@runtime_checkable
class Source(Protocol):
    """What a :class:`~batchfit.Batcher` needs from its data."""

    names: tuple[str, ...] | None

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray, pin_memory: bool = False) -> Batch: ...


def _as_tensor(name: str, array: Any) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        tensor = array
    elif isinstance(array, np.ndarray):
        if array.dtype.kind in "OUSVMm":  # objects, strings, bytes, records, datetimes, timedeltas
            raise expected(name, "a numeric array", f"an array of dtype {array.dtype} (numbers or booleans only)")
        # from_numpy shares memory (also of read-only memory maps, which batchfit never
        # writes to); only non-contiguous arrays are copied.
        array = np.ascontiguousarray(array) if array.ndim else array  # (it would make a 0-d array 1-d)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            tensor = torch.from_numpy(array)
    elif isinstance(array, (list, tuple)) or _is_pandas(array):
        try:
            converted = np.asarray(array)
        except ValueError as error:  # a ragged list: rows of different lengths
            first = str(error).split(". ")[-1].strip() if "inhomogeneous" in str(error) else str(error)
            raise expected(name, "a rectangular array (every sample of the same shape; pad variable-length rows, "
                           "or write them as ragged shards)", f"a ragged {type(array).__name__} ({first})") from None
        return _as_tensor(name, converted)
    else:
        raise expected(name, "a numpy array or a torch tensor", type(array).__name__)
    if tensor.dim() == 0:
        raise expected(name, "an array whose first dimension counts samples", "a 0-d scalar")
    if tensor.device.type != "cpu":
        raise expected(name, "an array in host memory", f"a tensor on {tensor.device}")
    return tensor.contiguous()


class ArraySource:
    """Aligned arrays in memory whose first dimension counts samples.

    ``ArraySource(x, y)`` gives tuple batches ``(x, y)``; ``ArraySource(x=..., y=...)`` gives
    dict batches. Numpy arrays are shared, not copied, when they are C-contiguous.
    """

    def __init__(self, *arrays: Any, **named: Any) -> None:
        if arrays and named:
            raise InputError(
                "`ArraySource` takes either positional arrays or named arrays, not both. "
                f"Received: {len(arrays)} positional and names {sorted(named)}"
            )
        if not arrays and not named:
            raise expected("arrays", "at least one array", "none")
        if named:
            self.names: tuple[str, ...] | None = tuple(named)
            items = list(named.items())
        else:
            self.names = None
            items = [(f"arrays[{i}]", a) for i, a in enumerate(arrays)]
        self.tensors = tuple(_as_tensor(name, a) for name, a in items)
        lengths = {name: t.shape[0] for (name, _), t in zip(items, self.tensors)}
        if len(set(lengths.values())) > 1:
            raise InputError(
                "All arrays of a source must have the same number of samples (first dimension). "
                f"Received lengths: {lengths}"
            )
        self._len = next(iter(lengths.values()))
        self._arrays = [_numpy_view(t) for t in self.tensors]
        self._numpy_only = all(a is not None for a in self._arrays)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(t.shape)}:{t.dtype}" for t in self.tensors)
        return f"ArraySource({shapes})"

    def lengths(self) -> np.ndarray | None:
        """Each sample's length, the longest of its ``NAME_lengths`` arrays; ``None`` without any."""
        if self.names is None:
            return None
        found = [t for name, t in zip(self.names, self.tensors)
                 if name.endswith(LENGTHS) and name[: -len(LENGTHS)] in self.names]
        return None if not found else np.maximum.reduce([t.numpy().astype(np.int64) for t in found])

    def gather(self, indices: np.ndarray, pin_memory: bool = False) -> Batch:
        """The batch of the samples at ``indices`` (1-D int64), each array gathered at once.

        Outputs are fresh tensors (pinned when asked), so a batch a caller still holds is never
        overwritten; NumPy's and PyTorch's allocators recycle the memory of freed batches.
        """
        if self._numpy_only and not pin_memory:
            # mode="clip" skips NumPy's bounds-check buffering; indices come from the batcher.
            arrays = cast("list[np.ndarray]", self._arrays)  # _numpy_only: no None among them
            return pack(self.names, [torch.from_numpy(a.take(indices, 0, None, "clip")) for a in arrays])
        indices = np.asarray(indices)
        out = []
        for tensor, array in zip(self.tensors, self._arrays):
            if array is None:  # a dtype NumPy lacks (bfloat16): gather in torch
                out.append(_pin(tensor[torch.from_numpy(indices)], pin_memory))
            elif pin_memory:
                buffer = torch.empty((len(indices),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
                np.take(array, indices, axis=0, out=buffer.numpy(), mode="clip")
                out.append(buffer)
            else:
                out.append(torch.from_numpy(array.take(indices, 0, None, "clip")))
        return pack(self.names, out)


def _numpy_view(tensor: torch.Tensor) -> np.ndarray | None:
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError):
        return None


def _pin(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin_memory else tensor


class DatasetSource:
    """A map-style ``torch.utils.data.Dataset`` seen as a source.

    Uses the dataset's ``__getitems__`` when it has one (one call per batch); otherwise it
    falls back to one ``dataset[i]`` per sample and stacks them, which is as slow as a
    ``DataLoader``. Samples must be tuples, dicts or single tensors/arrays.
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise expected("dataset", "a map-style Dataset (with __getitem__ and __len__)", type(dataset).__name__)
        self.dataset = dataset
        first = dataset[0] if len(dataset) else None
        self.names = tuple(first) if isinstance(first, Mapping) else None
        self._single = first is not None and not isinstance(first, (Mapping, tuple, list))

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, indices: np.ndarray, pin_memory: bool = False) -> Batch:
        """The batch at ``indices``, collated with ``torch.utils.data.default_collate``."""
        index_list = indices.tolist()
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(index_list) if getitems is not None else [self.dataset[i] for i in index_list]
        if isinstance(samples, (tuple, Mapping)) and not isinstance(samples, list):
            batch = samples  # __getitems__ already returned a collated batch
        else:
            batch = torch.utils.data.default_collate(samples)
        if self._single:
            batch = (batch,)
        tensors = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
        tensors = [_pin(torch.as_tensor(t), pin_memory) for t in tensors]
        return pack(self.names, tensors)


def pack(names: tuple[str, ...] | None, tensors: Sequence[torch.Tensor]) -> Batch:
    """A tuple batch, or a dict batch when the source has names."""
    if names is None:
        return tuple(tensors)
    return dict(zip(names, tensors))


def as_source(data: Any, name: str = "data") -> Source:
    """Turn what users pass as training data into a source.

    Accepts a source, a tuple/list of arrays, a dict of arrays, or a map-style ``Dataset``.
    """
    if isinstance(data, (str, bytes, os.PathLike)):
        raise expected(name, "data, not a path: open a shard folder with bf.ShardSource(path), load arrays with "
                       "np.load(path)", os.fsdecode(data))
    if isinstance(data, (ArraySource, DatasetSource)) or (
        hasattr(data, "gather") and hasattr(data, "names") and hasattr(data, "__len__")
    ):
        source = data
    elif _is_pandas(data):
        source = ArraySource(np.asarray(data))  # a DataFrame or Series: one array, converted once
    elif isinstance(data, tuple) and data and all(
            isinstance(a, (np.ndarray, torch.Tensor, list)) or _is_pandas(a) for a in data):
        source = ArraySource(*data)  # (x, y) of arrays, lists or pandas objects
    elif isinstance(data, list) and data and all(isinstance(a, (np.ndarray, torch.Tensor)) for a in data):
        source = ArraySource(*data)
    elif isinstance(data, Mapping) and data:
        source = ArraySource(**data)
    elif isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if isinstance(data, (np.ndarray, torch.Tensor)):
            source = ArraySource(data)
        else:
            source = DatasetSource(data)
    else:
        what = "a source, a tuple of arrays, a dict of arrays or a map-style Dataset"
        raise expected(name, what, type(data).__name__)
    if len(source) == 0:
        raise expected(name, "at least one sample", "an empty source (0 samples)")
    return source


class Selected:
    """Named arrays of a dict source served as a tuple in a given order (e.g. ``("x", "y")``), so that
    a plain ``model(x)`` trains on a named shard folder."""

    names = None

    def __init__(self, src: Source, keys: Sequence[str]) -> None:
        if src.names is None:
            raise expected("src", "a source of named arrays", "a tuple source")
        missing = [k for k in keys if k not in src.names]
        if missing:
            raise expected("keys", f"names of the source's arrays {list(src.names)}", list(keys))
        self.src, self.keys = src, tuple(keys)
        ask = getattr(src, "batches_per_gather", None)
        if ask is not None:
            self.batches_per_gather = ask
        if getattr(src, "gather_batches", None) is not None:
            self.gather_batches = self._gather_batches

    def __len__(self) -> int:
        return len(self.src)

    @property
    def classes(self) -> list[str] | None:
        """The class names of the underlying source, where it has them."""
        return getattr(self.src, "classes", None)

    def lengths(self) -> np.ndarray | None:
        """The sample lengths of the underlying source, where it has them."""
        return source_lengths(self.src)

    def gather(self, indices: np.ndarray, pin_memory: bool = False) -> Batch:
        """The selected arrays of ``src``'s batch, in order."""
        return self._select(self.src.gather(indices, pin_memory))

    def _gather_batches(self, parts: list[np.ndarray], pin_memory: bool = False) -> list[Batch]:
        """Several batches gathered by ``src`` at once (its ``gather_batches``), each with the selected arrays."""
        return [self._select(batch) for batch in self.src.gather_batches(parts, pin_memory)]  # type: ignore[attr-defined]

    def _select(self, batch: Batch) -> Batch:
        assert isinstance(batch, dict)
        return tuple(batch[key] for key in self.keys)


def _is_pandas(value: Any) -> bool:
    """A pandas DataFrame, Series or Index (without importing pandas)."""
    return type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "to_numpy")


def fingerprint(src: Source, rows: int = 16) -> str:
    """A cheap identity of a source's data: sample count, names, and the bytes, dtype and shape of
    ``rows`` samples spread evenly over it (BLAKE2b). Two sources that differ in any of those
    differ here; a resumed run compares it to refuse training on other data unnoticed."""
    n = len(src)
    digest = hashlib.blake2b(f"{n}|{src.names}".encode(), digest_size=16)
    if n:
        batch = src.gather(np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64)))
        for tensor in batch.values() if isinstance(batch, Mapping) else batch:
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes()
                          if tensor.numel() else b"")
    return digest.hexdigest()


def source_lengths(src: Source) -> np.ndarray | None:
    """Each sample's length (tokens of its longest variable-length array) where ``src`` knows them,
    else ``None``: what length-grouped shuffles and token-budget batches sort and count by."""
    lengths = getattr(src, "lengths", None)
    return None if lengths is None else lengths()
