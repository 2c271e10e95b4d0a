"""An image folder (one sub-folder per class) into a shard folder, in parallel processes.

Encoded (the default here): each file's bytes as they are — JPEG, PNG, WebP — as a
variable-length ``uint8`` array, or re-encoded where a side exceeds ``max_side``. Decoded:
``uint8`` pixels of one size ``(channels, height, width)``, as :func:`batchfit.data.convert.convert`
has always written. Either way every file is decoded once while writing, so a damaged file is
found now, named with the reason, and skipped or refused (``on_corrupt``), not met mid-training.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BatchfitError, check_choice, check_positive_int, expected
from ..shards import ShardSource, write_shards
from .transforms import pillow

ON_CORRUPT = ("error", "skip")
FILES_PER_TASK = 64  # files one writer process decodes per task; results come back in file order
GRAYSCALE = ("1", "L", "LA", "I", "I;16", "F")


def write_image_shards(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    decode: bool = False,
    image_size: int | tuple[int, int] | None = None,
    max_side: int | None = None,
    on_corrupt: str = "error",
    workers: int | None = None,
    progress: bool = True,
    shard_size: int | None = None,
    overwrite: bool = False,
) -> ShardSource:
    """Write the image folder ``folder`` (one sub-folder per class) as a shard folder at ``out``.

    Labels are ``int64`` in the sorted order of the class names, which the manifest keeps
    (``ShardSource.classes``). By default each image is kept encoded (its file's bytes);
    ``max_side`` re-encodes images whose longer side exceeds it (JPEG quality 90, PNG for
    other formats). ``decode=True`` (implied by ``image_size``, an ``int`` or ``(height, width)``
    to resize to) stores ``uint8`` pixels instead, which must then all have one size.

    A file that Pillow cannot decode is named with the reason: ``on_corrupt="error"`` refuses
    the folder (nothing is written), ``"skip"`` leaves it out with a warning and lists it in the
    manifest's ``metadata["images"]["skipped"]``. ``workers`` processes decode and encode in
    parallel (default: the CPU count, at most 8; 0 works in this process); ``progress`` shows a
    progress bar. Returns the new folder opened as a :class:`~batchfit.ShardSource`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise expected("folder", "an existing folder with one sub-folder of images per class", str(folder))
    check_choice("on_corrupt", on_corrupt, ON_CORRUPT)
    size = image_size_pair(image_size)
    decode = decode or size is not None
    if max_side is not None:
        check_positive_int("max_side", max_side)
        if decode:
            raise expected("max_side", "None when images are decoded (use image_size)", max_side)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    check_positive_int("workers", workers, allow_zero=True)
    if not isinstance(progress, bool):
        raise expected("progress", "True or False", progress)
    image_module = pillow()
    classes = class_names(folder)
    files = list(image_files(folder, classes, set(image_module.registered_extensions())))
    if not files:
        raise expected("folder", "image files in its class sub-folders", f"{folder}, which has none")
    mode = _first_mode([path for path, _ in files])
    skipped: list[dict[str, str]] = []
    info: dict[str, Any] = {"encoded": not decode, "mode": mode, "max_side": max_side, "skipped": skipped}
    # write_shards stores the metadata when it finishes, so files skipped while writing are listed.
    metadata = {"converted_from": folder.name, "classes": classes, "images": info}
    batches = _batches(files, mode, decode, size, max_side, on_corrupt, workers, progress, skipped)
    return write_shards(out, batches, shard_size=shard_size, overwrite=overwrite, metadata=metadata)


def image_size_pair(image_size: Any) -> tuple[int, int] | None:
    """``image_size`` (``None``, an ``int`` or a ``(height, width)`` pair) as a pair, checked."""
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2):
        raise expected("image_size", "an int or a (height, width) pair", image_size)
    return (check_positive_int("image_size[0]", image_size[0]), check_positive_int("image_size[1]", image_size[1]))


def class_names(folder: Path) -> list[str]:
    """The sorted names of ``folder``'s sub-folders (hidden ones left out): the classes."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise expected("in_path", "a folder with one sub-folder of images per class", f"{folder}, which has none")
    return classes


def image_files(folder: Path, classes: list[str], extensions: set[str]) -> Iterator[tuple[Path, int]]:
    """``(path, label)`` of every image file, class by class, each class's files in sorted order."""
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions:
                yield path, label


def _first_mode(paths: list[Path]) -> str:
    """``"L"`` when the first readable image is grayscale, else ``"RGB"``."""
    image_module = pillow()
    for path in paths:
        try:
            with image_module.open(path) as image:
                return "L" if image.mode in GRAYSCALE else "RGB"
        except (OSError, ValueError):
            continue
    return "RGB"


def _batches(files: list[tuple[Path, int]], mode: str, decode: bool, size: tuple[int, int] | None,
             max_side: int | None, on_corrupt: str, workers: int, progress: bool,
             skipped: list[dict[str, str]]) -> Iterator[tuple[Any, np.ndarray]]:
    """``(images, labels)`` per task of files, in file order, as the writer processes finish them."""
    from tqdm.auto import tqdm

    tasks = [files[lo : lo + FILES_PER_TASK] for lo in range(0, len(files), FILES_PER_TASK)]
    jobs = [([str(p) for p, _ in task], mode, decode, size, max_side) for task in tasks]
    first_size = size
    bar = tqdm(total=len(files), unit="img", desc="images", disable=not progress, leave=False)
    pool: Executor | None = None
    try:
        if workers and len(jobs) > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
            results: Iterator[list[Any]] = pool.map(_prepare_files, *zip(*jobs))
        else:
            results = (_prepare_files(*job) for job in jobs)
        for task, prepared in zip(tasks, results):
            images, labels = [], []
            for (path, label), (result, reason) in zip(task, prepared):
                if reason is not None:
                    if on_corrupt == "error":
                        raise BatchfitError(f"Image {path} cannot be read: {reason} "
                                            "(on_corrupt='skip', --on-corrupt skip, leaves such files out)")
                    warnings.warn(f"skipped image {path}: {reason}", stacklevel=2)
                    skipped.append({"file": str(path), "reason": reason})
                    continue
                if decode:
                    first_size = first_size or result.shape[1:]
                    if result.shape[1:] != tuple(first_size):
                        raise expected(f"image {path}",
                                       f"height x width {first_size[0]}x{first_size[1]} like the first image "
                                       "(or pass image_size)", f"{result.shape[1]}x{result.shape[2]}")
                images.append(result)
                labels.append(label)
            bar.update(len(task))
            if images:
                yield (np.stack(images) if decode else images), np.array(labels, dtype=np.int64)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _prepare_files(paths: list[str], mode: str, decode: bool, size: tuple[int, int] | None,
                   max_side: int | None) -> list[tuple[np.ndarray | None, str | None]]:
    """``(encoded bytes or pixels, None)`` or ``(None, reason)`` per file (in a writer process)."""
    out: list[tuple[np.ndarray | None, str | None]] = []
    for path in paths:
        try:
            out.append((_prepare(Path(path), mode, decode, size, max_side), None))
        except Exception as error:  # noqa: BLE001 (Pillow raises many kinds for a damaged file)
            out.append((None, f"{type(error).__name__}: {error}"))
    return out


def _prepare(path: Path, mode: str, decode: bool, size: tuple[int, int] | None, max_side: int | None) -> np.ndarray:
    """One file's bytes (re-encoded past ``max_side``) or its decoded pixels ``(channels, height, width)``.

    Every file is decoded in full, so a truncated or damaged one raises here.
    """
    image_module = pillow()
    with image_module.open(path) as image:  # by path, so that Pillow's messages name the file
        image.load()
        data = path.read_bytes()
        if image.width < 1 or image.height < 1:
            raise ValueError("the image has no pixels")
        if decode:
            converted = image.convert(mode)
            if size is not None:
                converted = converted.resize((size[1], size[0]), image_module.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
            return pixels.reshape(converted.height, converted.width, -1).transpose(2, 0, 1)
        if max_side is not None and max(image.size) > max_side:
            smaller = image.convert(mode)
            smaller.thumbnail((max_side, max_side), image_module.Resampling.LANCZOS)
            buffer = io.BytesIO()
            if image.format == "JPEG":
                smaller.save(buffer, format="JPEG", quality=90)
            else:
                smaller.save(buffer, format="PNG")
            data = buffer.getvalue()
    return np.frombuffer(data, dtype=np.uint8).copy()
