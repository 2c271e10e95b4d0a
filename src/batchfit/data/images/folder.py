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

from ...errors import InputError, check_choice, check_positive_int, expected
from ..shards import ShardSource, write_shards
from .transforms import convert_mode, pillow

ON_CORRUPT = ("error", "skip")
FILES_PER_TASK = 64  # files one writer process decodes per task; results come back in file order
GRAYSCALE = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


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
    mode: str | None = None,
    follow_symlinks: bool = False,
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

    ``mode`` is the colour mode of the whole set, ``"RGB"`` or ``"L"`` (grayscale); by default
    ``"L"`` only when every image is grayscale, else ``"RGB"`` (one grayscale file among colour
    ones does not make the set grayscale). Images of 16 bits a channel are scaled to 8.
    Symbolic links that lead out of ``folder`` are refused unless ``follow_symlinks``; a class
    sub-folder without images is refused (it would be a class without samples).
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
    if mode is not None:
        check_choice("mode", mode, ("RGB", "L"))
    image_module = pillow()
    classes = class_names(folder)
    files = list(image_files(folder, classes, set(image_module.registered_extensions())))
    if not files:
        raise expected("folder", "image files in its class sub-folders", f"{folder}, which has none")
    _check_files(folder, classes, files, follow_symlinks)
    if mode is None and decode:  # pixels are converted while writing: the set's mode is needed first
        mode = _set_mode([path for path, _ in files])
    skipped: list[dict[str, str]] = []
    # Encoded images keep their own bytes: without a given mode the set's is learnt while writing,
    # from every file (write_shards stores the metadata when it finishes, with the skipped files too).
    info: dict[str, Any] = {"encoded": not decode, "mode": mode or "RGB", "max_side": max_side, "skipped": skipped}
    metadata = {"converted_from": folder.name, "classes": classes, "images": info}
    batches = _batches(files, mode or "RGB", decode, size, max_side, on_corrupt, workers, progress, skipped,
                       info if mode is None else None)
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


def _check_files(folder: Path, classes: list[str], files: list[tuple[Path, int]], follow_symlinks: bool) -> None:
    """Refuse class sub-folders without images, and (unless ``follow_symlinks``) links out of ``folder``."""
    counts = np.bincount(np.array([label for _, label in files], dtype=np.int64), minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InputError(f"class sub-folder(s) {', '.join(str(folder / name) for name in empty[:3])} of {folder} "
                            f"hold no images: each would be a class without samples. Remove the empty folder(s), or "
                            f"put images in them")
    if follow_symlinks:
        return
    root = folder.resolve()
    outside = [path for path, _ in files if path.is_symlink() or path.parent.is_symlink()
               if not path.resolve().is_relative_to(root)]
    if outside:
        raise InputError(f"{len(outside)} image(s) of {folder} are symbolic links out of it, e.g. {outside[0]} -> "
                            f"{outside[0].resolve()}: pass follow_symlinks=True (--follow-symlinks) to read them")


def _set_mode(paths: list[Path]) -> str:
    """``"L"`` when every readable image is grayscale, else ``"RGB"`` (headers only: nothing decoded)."""
    image_module = pillow()
    for path in paths:
        try:
            with image_module.open(path) as image:
                if image.mode not in GRAYSCALE:
                    return "RGB"
        except Exception:  # noqa: BLE001 - a damaged file (or a bomb) is named when it is decoded
            continue
    return "L"


def _batches(files: list[tuple[Path, int]], mode: str, decode: bool, size: tuple[int, int] | None,
             max_side: int | None, on_corrupt: str, workers: int, progress: bool,
             skipped: list[dict[str, str]], learn_mode: dict[str, Any] | None = None
             ) -> Iterator[tuple[Any, np.ndarray]]:
    """``(images, labels)`` per task of files, in file order, as the writer processes finish them.

    With ``learn_mode`` (the metadata's images entry), its ``mode`` ends ``"L"`` when every file
    written was grayscale, else ``"RGB"``."""
    all_gray = True
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
            for (path, label), (result, reason, gray) in zip(task, prepared):
                if reason is not None:
                    if on_corrupt == "error":
                        raise InputError(f"Image {path} cannot be read: {reason} "
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
                all_gray = all_gray and gray
            bar.update(len(task))
            if images:
                yield (np.stack(images) if decode else images), np.array(labels, dtype=np.int64)
        if learn_mode is not None:
            learn_mode["mode"] = "L" if all_gray else "RGB"
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _prepare_files(paths: list[str], mode: str, decode: bool, size: tuple[int, int] | None,
                   max_side: int | None) -> list[tuple[np.ndarray | None, str | None, bool]]:
    """``(encoded bytes or pixels, None, grayscale)`` or ``(None, reason, False)`` per file (in a writer process)."""
    out: list[tuple[np.ndarray | None, str | None, bool]] = []
    for path in paths:
        try:
            out.append(_prepared(Path(path), mode, decode, size, max_side))
        except Exception as error:  # noqa: BLE001 (Pillow raises many kinds for a damaged file)
            out.append((None, f"{type(error).__name__}: {error}", False))
    return out


def _prepared(path: Path, mode: str, decode: bool, size: tuple[int, int] | None,
              max_side: int | None) -> tuple[np.ndarray, None, bool]:
    data, gray = _prepare(path, mode, decode, size, max_side)
    return data, None, gray


def _prepare(path: Path, mode: str, decode: bool, size: tuple[int, int] | None,
             max_side: int | None) -> tuple[np.ndarray, bool]:
    """One file's bytes (re-encoded past ``max_side``) or its decoded pixels ``(channels, height, width)``,
    and whether it is grayscale.

    Every file is decoded in full, so a truncated or damaged one raises here.
    """
    image_module = pillow()
    with image_module.open(path) as image:  # by path, so that Pillow's messages name the file
        image.load()
        data = path.read_bytes()
        gray = image.mode in GRAYSCALE
        if image.width < 1 or image.height < 1:
            raise ValueError("the image has no pixels")
        if decode:
            converted = convert_mode(image, mode)
            if size is not None:
                converted = converted.resize((size[1], size[0]), image_module.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
            return pixels.reshape(converted.height, converted.width, -1).transpose(2, 0, 1), gray
        if max_side is not None and max(image.size) > max_side:
            smaller = convert_mode(image, "L" if gray else "RGB")  # each file keeps its own mode
            smaller.thumbnail((max_side, max_side), image_module.Resampling.LANCZOS)
            buffer = io.BytesIO()
            if image.format == "JPEG":
                smaller.save(buffer, format="JPEG", quality=90)
            else:
                smaller.save(buffer, format="PNG")
            data = buffer.getvalue()
    return np.frombuffer(data, dtype=np.uint8).copy(), gray
