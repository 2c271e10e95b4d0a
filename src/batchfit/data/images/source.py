"""ImageSource: a shard folder of images whose batches come decoded and augmented."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ...core.batch import Batch
from ...errors import BatchfitError, InputError, expected
from ..shards import ShardSource
from .transforms import ImageTransform


class ImageSource:
    """A shard folder of images (encoded or decoded) whose batches are ``(float32 images, labels)``.

    ``src`` is a :class:`~batchfit.ShardSource` or the path of one written by
    :func:`write_image_shards`; ``transform`` an :class:`ImageTransform`
    (:func:`train_transform`, :func:`eval_transform`) or any callable with its signature.
    :meth:`gather` decodes and transforms the batch where it is gathered: in the
    :class:`~batchfit.Batcher`'s worker processes with ``workers=n``. The Batcher passes its seed
    and the epoch, so the augmentation of a sample is a pure function of (seed, epoch, sample);
    any other caller (evaluation, probes of ``batch_size="auto"``) gets that of epoch 0, seed 0.
    """

    # The Batcher calls gather(indices, pin_memory, seed=..., epoch=...) on such a source.
    seeded_gather = True

    def __init__(self, src: ShardSource | str | os.PathLike, transform: Any) -> None:
        if isinstance(src, (str, os.PathLike)):
            src = ShardSource(src)
        if not isinstance(src, ShardSource):
            raise expected("src", "a ShardSource or the path of a shard folder of images", type(src).__name__)
        if not callable(transform):
            raise expected("transform", "an image transform (bf.images.train_transform(size), ...)", transform)
        info = src.metadata.get("images")
        if src.names is not None or len(src.specs) != 2 or src.specs[1].dtype != np.int64:
            raise expected("src", "a shard folder of images and labels (bf.images.write_image_shards)",
                           src.summary())
        self.src, self.transform = src, transform
        self.mode = info.get("mode") if isinstance(info, dict) else None
        self.names = None

    def __len__(self) -> int:
        return len(self.src)

    def __repr__(self) -> str:
        return f"ImageSource({str(self.src.path)!r}, samples={len(self)}, transform={self.transform!r})"

    @property
    def classes(self) -> list[str] | None:
        """The class names, index = label (those of the image folder's sub-folders)."""
        return self.src.classes

    @property
    def metadata(self) -> dict[str, Any]:
        """The shard folder's metadata (``"images"``: encoded or not, colour mode, skipped files)."""
        return self.src.metadata

    def check_sizes(self) -> None:
        """Check that the shard files still have their sizes (see :meth:`ShardSource.check_sizes`)."""
        self.src.check_sizes()

    def gather(self, indices: np.ndarray | torch.Tensor, pin_memory: bool = False, *, seed: int = 0,
               epoch: int = 0) -> Batch:
        """The decoded, transformed samples at ``indices``: ``(images, labels)``."""
        indices, batch = self._read(indices)
        with self._naming_the_folder():
            if isinstance(self.transform, ImageTransform):
                return self.transform(batch, seed=seed, epoch=epoch, indices=indices, pin_memory=pin_memory,
                                      mode=self.mode)
            return self.transform(batch, seed=seed, epoch=epoch, indices=indices, pin_memory=pin_memory)

    @contextlib.contextmanager
    def _naming_the_folder(self) -> Iterator[None]:
        """An image that cannot be decoded is named with its shard folder as well as its sample."""
        try:
            yield
        except BatchfitError as error:
            if str(error).startswith("the image of sample"):
                raise InputError(f"{self.src.path}: {error}") from error
            raise

    # Worker processes write the pixels of a batch into a shared buffer that is reused from batch to
    # batch (see data/worker_slots.py): 4x fewer bytes than float32 images, and no new shared segment
    # (a copy and page faults on both sides) for each batch. The Batcher uses these three methods
    # with ``workers=n`` where ``slot_shape`` is not None, and the result equals ``gather``'s.

    def slot_shape(self, batch_size: int) -> tuple[int, ...] | None:
        """The shape of the ``uint8`` pixels of a batch of at most ``batch_size`` (:meth:`gather_into`),
        or ``None`` where the transform is not an :class:`ImageTransform` or the folder does not
        record its colour mode (then :meth:`gather` does it all, in the worker)."""
        if not isinstance(self.transform, ImageTransform) or self.mode not in ("RGB", "L"):
            return None
        return (batch_size, self.transform.size, self.transform.size, 3 if self.mode == "RGB" else 1)

    def gather_into(self, indices: np.ndarray, out: np.ndarray, *, seed: int = 0, epoch: int = 0) -> np.ndarray:
        """Decode, crop and flip the samples at ``indices`` into ``out[:len(indices)]``; their labels."""
        assert isinstance(self.transform, ImageTransform)
        indices, batch = self._read(indices)
        with self._naming_the_folder():
            _, labels = self.transform.pixels(batch, seed=seed, epoch=epoch, indices=indices, mode=self.mode,
                                              out=out[: len(indices)])
        return labels.numpy()

    def finish(self, pixels: np.ndarray, labels: np.ndarray, pin_memory: bool = False) -> Batch:
        """The batch of pixels and labels from :meth:`gather_into`, as :meth:`gather` returns it."""
        assert isinstance(self.transform, ImageTransform)
        return self.transform.finish(pixels, pin_memory), torch.from_numpy(labels)

    def _read(self, indices: np.ndarray | torch.Tensor) -> tuple[np.ndarray, Any]:
        """The indices as an array, and their samples as the transform takes them (still encoded)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        indices = np.asarray(indices)
        return indices, self._encoded(indices) if self.src.specs[0].ragged else self.src.gather(indices)

    def _encoded(self, indices: np.ndarray) -> tuple[list[bytes], torch.Tensor]:
        """The encoded files of ``indices`` (each read whole, :meth:`ShardSource.read_rows`) and their labels.

        Gathered as variable-length rows, a batch of files would be padded to its longest and
        copied byte by byte; a file is read whole instead, past the memory maps, so that the
        resident memory of a process reading them does not grow with the data.
        """
        files = [row.tobytes() for row in self.src.read_rows(indices, 0)]
        return files, torch.from_numpy(self.src.take(indices, 1))
