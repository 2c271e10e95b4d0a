"""Image transforms on whole batches: decode, crop and resize, flip, normalise.

A batch comes in as encoded files with their labels — ``([bytes of each file], y)`` as
:class:`~batchfit.data.images.ImageSource` reads them, or ``(bytes, lengths, y)`` as
``ShardSource.gather`` pads them — or as decoded ``uint8`` images ``(x, y)`` of shape
``(batch, channels, height, width)``, and goes out as ``(float32 images, y)``.

Each image is decoded and cropped with Pillow, once, straight to the output size (Pillow's
``resize`` with a ``box`` crops and resizes in one pass, filtering like an antialiased resize);
a JPEG is decoded at a reduced scale (``Image.draft``: the DCT skips the detail a crop would
throw away) unless ``draft=False``. The flip is Pillow's; the normalisation runs on the whole batch.

The random parameters of sample ``i`` come from a generator seeded with ``(seed, epoch, i)``
(:func:`sample_uniforms`), never from a global generator: the same sample in the same epoch gets
the same crop and flip whichever process, batch or resumed run decodes it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...core.batch import Batch
from ...errors import BatchfitError, InputError, expected

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ATTEMPTS = 10  # tries for a crop of the drawn area and ratio, as torchvision's RandomResizedCrop
_UNIFORMS = 2 * _ATTEMPTS + 3  # area and ratio per attempt, the crop's position, the flip


def pillow() -> Any:
    """Pillow's ``Image`` module, with a clear message where Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("Images need Pillow, which is not installed. Install it with: "
                          "pip install 'batchfit[images]'") from error
    return Image


def sample_uniforms(seed: int, epoch: int, indices: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniform numbers in [0, 1) per sample, a pure function of ``(seed, epoch, index)``."""
    out = np.empty((len(indices), count))
    for row, index in enumerate(indices.tolist()):
        out[row] = np.random.default_rng([seed, epoch, index]).random(count)
    return out


def random_resized_box(width: int, height: int, u: np.ndarray, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """The crop box ``(left, top, right, bottom)`` of a random-resized crop, drawn from ``u``.

    As torchvision's ``RandomResizedCrop``: up to 10 tries of an area fraction uniform in
    ``scale`` and an aspect ratio log-uniform in ``ratio``; the first that fits the image is
    placed uniformly; if none fits, the largest centred crop whose ratio is clamped to ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * attempt])
        aspect = math.exp(log_low + (log_high - log_low) * u[2 * attempt + 1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = math.floor(u[-3] * (width - w + 1))
            top = math.floor(u[-2] * (height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def centre_box(width: int, height: int, size: int, resize: int) -> tuple[float, float, float, float]:
    """The box of a resize of the shorter side to ``resize`` followed by a centre crop of ``size``."""
    side = size * min(width, height) / resize
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _check_range(name: str, value: Any, low: float) -> tuple[float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not low < value[0] <= value[1]):
        raise expected(name, f"a pair (low, high) with {low} < low <= high", value)
    return float(value[0]), float(value[1])


class ImageTransform:
    """Decode, crop and resize to ``size`` x ``size``, flip, and normalise a batch of images.

    Made by :func:`train_transform` (random-resized crop and flip) or :func:`eval_transform`
    (resize and centre crop). Call it as ``transform(batch, seed=, epoch=, indices=)``: the
    random numbers of sample ``indices[i]`` are drawn from ``(seed, epoch, indices[i])``. Called
    as a plain ``transform(batch)`` it draws a batch key from torch's global generator instead
    (which the :class:`~batchfit.Batcher` seeds per batch in its workers).
    """

    def __init__(self, size: int, *, train: bool, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True, resize: int | None = None,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 draft: bool = True) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise expected("size", "a positive integer (the side of the output images)", size)
        self.size, self.train = size, bool(train)
        self.scale = _check_range("scale", tuple(scale), 0.0)
        if self.scale[1] > 1:
            raise expected("scale", "area fractions of at most 1", scale)
        self.ratio = _check_range("ratio", tuple(ratio), 0.0)
        if not isinstance(flip, bool):
            raise expected("flip", "True or False", flip)
        self.flip = flip
        resize = round(size * 256 / 224) if resize is None else resize
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < size:
            raise expected("resize", f"an integer of at least size={size}", resize)
        self.resize = resize
        if (mean is None) != (std is None):
            raise expected("std", "given together with mean (or neither)", std)
        if std is not None and any(v <= 0 for v in std):
            raise expected("std", "positive values", std)
        if mean is not None and std is not None and len(mean) != len(std):
            raise expected("std", f"{len(mean)} values, one per value of mean={tuple(mean)}", std)
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        if not isinstance(draft, bool):
            raise expected("draft", "True or False", draft)
        self.draft = draft

    def __repr__(self) -> str:
        kind = f"train, scale={self.scale}, ratio={self.ratio}, flip={self.flip}" if self.train else \
            f"eval, resize={self.resize}"
        return f"ImageTransform(size={self.size}, {kind}, mean={self.mean}, std={self.std})"

    def __call__(self, batch: Batch | tuple[list[bytes], torch.Tensor], *, seed: int | None = None,
                 epoch: int = 0, indices: Any = None, pin_memory: bool = False, mode: str | None = None) -> Batch:
        """``(float32 images (batch, channels, size, size), labels)`` of an image batch.

        ``mode`` (``"RGB"`` or ``"L"``) is the colour mode every image is converted to; by
        default that of the batch's first image. ``pin_memory`` puts the output in pinned memory.
        """
        pixels, labels = self.pixels(batch, seed=seed, epoch=epoch, indices=indices, mode=mode)
        return self.finish(pixels, pin_memory), labels

    def pixels(self, batch: Batch | tuple[list[bytes], torch.Tensor], *, seed: int | None = None, epoch: int = 0,
               indices: Any = None, mode: str | None = None, out: np.ndarray | None = None
               ) -> tuple[np.ndarray, torch.Tensor]:
        """The decoded, cropped and flipped images as ``uint8`` ``(batch, size, size, channels)``, and the labels.

        The first half of a call (arguments as there), without the float conversion and
        normalisation of :meth:`finish`; ``out`` is an array of that shape to write into (a
        worker's shared buffer), else a new one is made.
        """
        images, labels = _split(batch)
        count = len(labels)
        if indices is None:  # a plain transform(batch): a batch key from torch's generator (none for eval)
            seed, indices = int(torch.randint(2**62, (1,)).item()) if self.train else 0, np.arange(count)
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) != count:
            raise expected("indices", f"{count} sample indices, one per image", len(indices))
        uniforms = sample_uniforms(seed or 0, epoch, indices, _UNIFORMS) if self.train else None
        if mode not in (None, "RGB", "L"):
            raise expected("mode", "'RGB', 'L' or None", mode)
        channels = _channels(images) if mode is None else 1 if mode == "L" else 3
        shape = (count, self.size, self.size, channels)
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise expected("out", f"a uint8 array of shape {shape}", f"{out.dtype} {out.shape}")
        for row in range(count):
            try:
                image = images(row)
                box = self._box(image, None if uniforms is None else uniforms[row])
                flip = uniforms is not None and self.flip and uniforms[row, -1] < 0.5
                out[row] = _crop_resize(image, box, self.size, self.draft, channels, flip)
            except Exception as error:  # Pillow raises many kinds for bytes that are no image (or a bomb)
                if isinstance(error, BatchfitError):
                    raise
                raise InputError(f"the image of sample {int(indices[row])} cannot be decoded "
                                    f"({type(error).__name__}: {error}): the shard folder is damaged (find the "
                                    f"file with `batchfit shards verify`, and write the folder again)") from error
        return out, labels

    def _box(self, image: Any, u: np.ndarray | None) -> tuple[float, float, float, float]:
        width, height = image.size
        if u is None:
            return centre_box(width, height, self.size, self.resize)
        return random_resized_box(width, height, u, self.scale, self.ratio)

    def finish(self, pixels: np.ndarray, pin_memory: bool = False) -> torch.Tensor:
        """``uint8`` images ``(batch, size, size, channels)`` (from :meth:`pixels`) as normalised ``float32``
        ``(batch, channels, size, size)``, in pinned memory with ``pin_memory``."""
        channels = pixels.shape[-1]
        out = torch.empty((len(pixels), channels, self.size, self.size), dtype=torch.float32, pin_memory=pin_memory)
        out.copy_(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        mean = (0.0,) * channels if self.mean is None else self.mean
        std = (1.0,) * channels if self.std is None else self.std
        if len(mean) != channels or len(std) != channels:
            hint = (" (the images are grayscale: the shard folder's mode is 'L'; give one mean and std, e.g. "
                    "mean=(0.449,), std=(0.226,), or write the folder with mode='RGB')") if channels == 1 else ""
            raise expected("mean", f"{channels} values, one per channel of the images{hint}", mean)
        # (x / 255 - mean) / std in one multiply and one subtract
        out.mul_(torch.tensor([1 / (255 * s) for s in std]).reshape(1, -1, 1, 1))
        out.sub_(torch.tensor([m / s for m, s in zip(mean, std)]).reshape(1, -1, 1, 1))
        return out


def train_transform(size: int, *, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                    flip: bool = True, mean: Sequence[float] | None = IMAGENET_MEAN,
                    std: Sequence[float] | None = IMAGENET_STD, draft: bool = True) -> ImageTransform:
    """The usual training augmentation: a random-resized crop to ``size``, a horizontal flip, normalisation.

    The crop covers an area fraction uniform in ``scale`` with an aspect ratio log-uniform in
    ``ratio`` (torchvision's ``RandomResizedCrop``); ``flip`` mirrors half the images;
    ``(x / 255 - mean) / std`` per channel (``mean=None, std=None``: only ``x / 255``).
    ``draft=False`` decodes every JPEG at full size (slower; the same pixels as Pillow's
    ``Image.open(...).convert(...)`` before the crop).
    """
    return ImageTransform(size, train=True, scale=scale, ratio=ratio, flip=flip, mean=mean, std=std, draft=draft)


def eval_transform(size: int, *, resize: int | None = None, mean: Sequence[float] | None = IMAGENET_MEAN,
                   std: Sequence[float] | None = IMAGENET_STD, draft: bool = True) -> ImageTransform:
    """Evaluation: resize the shorter side to ``resize`` (default ``size * 256 / 224``), centre-crop ``size``.

    No random numbers; normalisation as in :func:`train_transform`.
    """
    return ImageTransform(size, train=False, resize=resize, mean=mean, std=std, draft=draft)


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel of more than 8 bits


def convert_mode(image: Any, mode: str) -> Any:
    """``image.convert(mode)``, but an image of more than 8 bits a pixel (a 16-bit PNG) scaled to 8 bits
    first: Pillow's own conversion clips it, which turns a 16-bit image nearly all white."""
    if image.mode in WIDE_MODES:
        pixels = np.asarray(image)
        if image.mode == "F":
            top = 1.0 if float(pixels.max(initial=0.0)) <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or int(pixels.max(initial=0)) > 255 else 255.0
        scaled = np.clip(np.rint(pixels.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
        image = pillow().fromarray(scaled, "L")
    return image if image.mode == mode else image.convert(mode)


def decode(batch: Batch, mode: str | None = None) -> list[np.ndarray]:
    """The images of an encoded batch ``(bytes, lengths, ...)`` as ``uint8`` arrays ``(height, width, channels)``.

    Exactly Pillow's pixels: ``np.asarray(Image.open(file).convert(mode))`` (``mode`` default:
    ``"RGB"``, or ``"L"`` for grayscale files).
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # (bytes, lengths) without labels
        batch = (*batch, torch.zeros(len(batch[0])))
    images, _ = _split(batch)
    out = []
    for row in range(len(images)):
        image = images(row)
        pixels = np.asarray(convert_mode(image, mode or image.mode_wanted))
        out.append(pixels.reshape(pixels.shape[0], pixels.shape[1], -1))
    return out


class _Images:
    """The images of a batch, opened one at a time as Pillow images."""

    def __init__(self, data: torch.Tensor | list[bytes], lengths: torch.Tensor | None, decoded: bool) -> None:
        self.data = data if isinstance(data, list) else data.numpy()
        self.lengths = None if lengths is None else lengths.numpy()
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.data)

    def __call__(self, row: int) -> Any:
        image_module = pillow()
        if self.decoded:  # (channels, height, width)
            pixels: Any = self.data[row]
            image = image_module.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0))
            image.mode_wanted = image.mode
            return image
        if isinstance(self.data, list):
            encoded = self.data[row]
        else:
            assert self.lengths is not None
            encoded = self.data[row, : int(self.lengths[row])].tobytes()
        image = image_module.open(io.BytesIO(encoded))
        image.mode_wanted = "L" if image.mode in ("1", "L", "LA", *WIDE_MODES) else "RGB"
        return image


def _split(batch: Any) -> tuple[_Images, torch.Tensor]:
    """The images and labels of an encoded ``(bytes, lengths, y)`` or decoded ``(x, y)`` batch."""
    if isinstance(batch, dict) or not isinstance(batch, (tuple, list)):
        raise expected("batch", "a tuple (bytes, lengths, labels) or (images, labels) from a shard folder of images",
                       type(batch).__name__)
    if len(batch) == 2 and isinstance(batch[0], list) and all(isinstance(b, bytes) for b in batch[0]):
        return _Images(batch[0], None, decoded=False), batch[1]
    tensors = all(isinstance(t, torch.Tensor) for t in batch)
    if tensors and len(batch) == 3 and batch[0].dim() == 2 and batch[0].dtype == torch.uint8 and batch[1].dim() == 1:
        return _Images(batch[0], batch[1], decoded=False), batch[2]
    if tensors and len(batch) == 2 and batch[0].dim() == 4 and batch[0].dtype == torch.uint8:
        return _Images(batch[0], None, decoded=True), batch[1]
    shapes = [f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch]
    raise expected("batch", "encoded images (bytes, lengths, labels) or ([file bytes], labels), or uint8 images "
                   "(batch, channels, height, width) with labels", ", ".join(shapes))


def _channels(images: _Images) -> int:
    if len(images) == 0:
        return 3
    if images.decoded:
        assert isinstance(images.data, np.ndarray)
        return int(images.data.shape[1])
    return 1 if images(0).mode_wanted == "L" else 3


def _crop_resize(image: Any, box: tuple[float, float, float, float], size: int, draft: bool,
                 channels: int, flip: bool = False) -> np.ndarray:
    """The ``box`` of ``image`` resized to ``size`` x ``size`` (and mirrored with ``flip``), as ``uint8``
    (size, size, channels). Pillow mirrors an image several times faster than a NumPy copy through
    a reversed view (18 against 70-110 us at 112 x 112 RGB, measured)."""
    image_module = pillow()
    mode = "L" if channels == 1 else "RGB"
    width, height = image.size
    if draft and image.format == "JPEG":
        # Ask for the smallest DCT scale that keeps the box at least `size` pixels on each side.
        # Pillow's scales are 1/2, 1/4 and 1/8; where none fits and no mode changes, asking costs more than it saves.
        want = (math.ceil(width * size / max(1.0, box[2] - box[0])),
                math.ceil(height * size / max(1.0, box[3] - box[1])))
        if min(width // want[0], height // want[1]) >= 2 or image.mode != mode:
            image.draft(mode, want)
            sx, sy = image.size[0] / width, image.size[1] / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if image.mode != mode:
        image = convert_mode(image, mode)
    out = image.resize((size, size), image_module.Resampling.BILINEAR, box=box)
    if flip:
        out = out.transpose(image_module.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(out)
    return pixels.reshape(size, size, channels)
