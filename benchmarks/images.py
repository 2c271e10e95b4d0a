"""Benchmarks of the image path: images/s against a torchvision-style pipeline, disk size, peak RSS.

    python benchmarks/run.py --only images [--quick] [--images 600] [--size 112] [--repeats 7] [--dir /tmp]

1. Throughput, side by side in one process: one shuffled epoch of generated JPEG files (4
   classes, 128 to 320 pixels a side), random-resized crop to ``--size``, flip, normalise, batch 64,
   with N = 1 and 2 worker processes (and N = 0: all in the main process, for the per-image cost):
   - baseline: what ``torchvision.datasets.ImageFolder`` + ``DataLoader(num_workers=N,
     pin_memory=True)`` does (a new loader each epoch, its default; also with
     ``persistent_workers=True``, whose workers outlive the epochs as batchfit's do; torchvision
     itself does not import next to the CPU torch here): a per-sample dataset that opens each
     file with Pillow, crops, resizes, flips, converts to a float tensor and normalises it,
     collated sample by sample;
   - batchfit: ``Batcher(ImageSource(encoded shards, train_transform(size)), workers=N)``, with
     and without decoding JPEGs at reduced scale (``draft``); from shards re-encoded to a longer
     side of at most 2x the crop (``max_side``: fewer pixels to decode, the files are not the
     same); and from decoded shards (pixels resized to 2x the crop, stored raw).
   Interleaved repeats, each round starting with the next candidate; medians of per-round ratios.
2. Disk: the bytes of the encoded shards against decoded shards of the size the crops need.
3. Memory: one epoch of training a small CNN from encoded shards ``--rss-mb`` large, in a child
   process whose peak RSS (VmHWM) is reported against the dataset's size.

``run(quick)`` returns the rows and figures; ``main`` prints them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchfit.data.batcher import Batcher
from batchfit.data.images import ImageSource, make_image_folder, train_transform, write_image_shards
from batchfit.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD, pillow, random_resized_box, sample_uniforms
from batchfit.data.shards import ShardSource, write_shards

from .common import Row, format_table, interleaved, ratio_row

BATCH = 64


class PerSampleImages(torch.utils.data.Dataset):
    """What torchvision's ImageFolder with RandomResizedCrop, RandomHorizontalFlip, ToTensor and
    Normalize does, sample by sample: open the file, decode it whole, crop, resize, flip, to float."""

    def __init__(self, files: list[tuple[Path, int]], size: int, seed: int = 0) -> None:
        self.files, self.size, self.seed, self.epoch = files, size, seed, 0
        self.mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image_module = pillow()
        path, label = self.files[index]
        u = sample_uniforms(self.seed, self.epoch, np.array([index]), 23)[0]
        with image_module.open(path) as image:
            image = image.convert("RGB")
            box = random_resized_box(image.width, image.height, u, (0.08, 1.0), (3 / 4, 4 / 3))
            image = image.crop(box).resize((self.size, self.size), image_module.Resampling.BILINEAR)
            if u[-1] < 0.5:
                image = image.transpose(image_module.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return (pixels.float() / 255 - self.mean) / self.std, label


def _epoch_of(loader_for_epoch: Callable[[int], Any]) -> Callable[[], int]:
    """A candidate: one epoch (the next each call) of a loader, returning the images seen."""
    epoch = [0]

    def run() -> int:
        epoch[0] += 1
        seen = 0
        for x, _ in loader_for_epoch(epoch[0]):
            seen += len(x)
        return seen

    return run


def _baseline(files: list[tuple[Path, int]], size: int, workers: int, persistent: bool = False
              ) -> Callable[[], int]:
    """The per-sample pipeline through a DataLoader made each epoch, or (``persistent``) one made once
    with ``persistent_workers=True``, whose workers then outlive the epochs as batchfit's do."""
    dataset = PerSampleImages(files, size)
    kept: list[Any] = []

    def loader(epoch: int) -> Any:
        dataset.epoch = epoch  # read by the workers when they start: the kept ones see the first epoch's
        generator = torch.Generator().manual_seed(epoch)
        if kept:
            return kept[0]
        made = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                           pin_memory=True, generator=generator, persistent_workers=persistent)
        if persistent:
            kept.append(made)
        return made

    return _epoch_of(loader)


def _batchfit(source: ImageSource, workers: int) -> Callable[[], int]:
    batcher = Batcher(source, batch_size=BATCH, shuffle=True, seed=0, workers=workers,
                      pin_memory=torch.cuda.is_available())

    def loader(epoch: int) -> Any:
        batcher.set_epoch(epoch)
        return batcher.remaining()

    return _epoch_of(loader)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def throughput_rows(root: Path, images: int, size: int, repeats: int, workers: tuple[int, ...] = (0, 1, 2)
                    ) -> tuple[list[Row], dict[str, Any]]:
    """Images/s of the baseline and of batchfit's sources at each worker count, and the disk sizes."""
    folder = make_image_folder(root / "jpeg", max(1, images // 4), classes=4, sizes=(128, 320))
    encoded = write_image_shards(folder, root / "encoded", progress=False)
    # Decoded shards must hold the crops' source pixels: the images resized to a fixed 2x the crop size.
    decoded = write_image_shards(folder, root / "decoded", image_size=2 * size, progress=False)
    # Re-encoded to a longer side of at most 2x the crop size (as FFCV's max_resolution): less to decode.
    smaller = write_image_shards(folder, root / "smaller", max_side=2 * size, progress=False)
    from batchfit.data.images.folder import class_names, image_files

    files = list(image_files(folder, class_names(folder), {".jpg"}))
    candidates: dict[str, Callable[[], int]] = {}
    for n in workers:
        candidates[f"baseline, {n} workers"] = _baseline(files, size, n)
        if n:
            candidates[f"baseline persistent_workers, {n} workers"] = _baseline(files, size, n, persistent=True)
        candidates[f"batchfit encoded, {n} workers"] = _batchfit(ImageSource(encoded, train_transform(size)), n)
        candidates[f"batchfit encoded no draft, {n} workers"] = _batchfit(
            ImageSource(encoded, train_transform(size, draft=False)), n)
        candidates[f"batchfit decoded, {n} workers"] = _batchfit(ImageSource(decoded, train_transform(size)), n)
        candidates[f"batchfit max_side {2 * size}, {n} workers"] = _batchfit(
            ImageSource(smaller, train_transform(size)), n)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")  # no accelerator here: nothing to pin
        for run in candidates.values():  # warm-up: page cache, imports in the workers
            run()
        rates = interleaved(candidates, repeats, rotate=True)
    rows = []
    for n in workers:
        base = f"baseline, {n} workers"
        rows.append(ratio_row(f"batchfit encoded, {n} workers", base, rates, ">=1.5" if n else "", "images/s"))
        if n:  # how much of the lead is the workers kept from epoch to epoch
            rows.append(ratio_row(f"batchfit encoded, {n} workers", f"baseline persistent_workers, {n} workers",
                                  rates, "", "images/s"))
        rows.append(ratio_row(f"batchfit encoded no draft, {n} workers", base, rates, "", "images/s"))
        rows.append(ratio_row(f"batchfit decoded, {n} workers", base, rates, "", "images/s"))
        rows.append(ratio_row(f"batchfit max_side {2 * size}, {n} workers", base, rates, "", "images/s"))
    sizes = {"jpeg_files": sum(p.stat().st_size for p, _ in files), "encoded_shards": _folder_bytes(encoded.path),
             "decoded_shards": _folder_bytes(decoded.path), "decoded_side": 2 * size, "images": len(files),
             "max_side_shards": _folder_bytes(smaller.path)}
    return rows, sizes


# --- peak RSS -------------------------------------------------------------------------------------

_CHILD = r"""
import json, resource, sys
import numpy as np, torch
import batchfit as bf
torch.set_num_threads(1)
path, size, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
source = bf.images.ImageSource(bf.ShardSource(path, max_mapped_bytes=bound), bf.images.train_transform(size))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(8, 4))
trainer = bf.Trainer(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.01),
                     batch_size=64, progress=False)
model(source.gather(np.arange(64))[0])  # warm-up: imports, allocator pools
start = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
trainer.fit(source, epochs=1)
peak = int([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"start_rss": start, "peak_rss": peak, "samples": trainer.samples_seen}))
"""


def write_big_encoded(path: Path, megabytes: int, seed: int = 0) -> ShardSource:
    """Encoded image shards of about ``megabytes`` MiB: 64 generated JPEGs (300-500 px) repeated."""
    from batchfit.data.images.synthetic import draw_image

    rng = np.random.default_rng(seed)
    encoded = []
    for number in range(64):
        image = draw_image(rng, number % 4, int(rng.integers(300, 501)), int(rng.integers(300, 501)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy())
    per_image = sum(len(e) for e in encoded) / len(encoded)
    total = int(megabytes * 2**20 / per_image)

    def batches() -> Any:
        for lo in range(0, total, 512):
            rows = [i % 64 for i in range(lo, min(total, lo + 512))]
            yield [encoded[i] for i in rows], np.array([i % 4 for i in rows], dtype=np.int64)

    return write_shards(path, batches(), metadata={"classes": ["circle", "square", "triangle", "cross"],
                                                   "images": {"encoded": True, "mode": "RGB"}})


def peak_rss(path: Path, size: int, bound: int) -> dict[str, int]:
    """Train one epoch from the shards at ``path`` in a child process; its start and peak RSS."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(size), str(bound)], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"the child failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def memory_rows(root: Path, megabytes: int, size: int = 32) -> dict[str, Any]:
    """Peak RSS of one training epoch over ``megabytes`` MiB of encoded shards (in a child process)."""
    source = write_big_encoded(root / "big", megabytes)
    return {"dataset_bytes": _folder_bytes(source.path), "samples": len(source), "size": size,
            **peak_rss(source.path, size, 64 * 2**20)}


def run(quick: bool = False, images: int | None = None, size: int = 112, repeats: int | None = None,
        rss_mb: int | None = None, folder: str | None = None) -> dict[str, Any]:
    """Every measurement: throughput rows, disk sizes and peak RSS (a dict, see the module docstring)."""
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-images-", dir=folder))
    try:
        rows, sizes = throughput_rows(root, images or (200 if quick else 600), size, repeats or (3 if quick else 7))
        memory = memory_rows(root, rss_mb or (256 if quick else 1024))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"rows": rows, "disk": sizes, "memory": memory}


def format_report(result: dict[str, Any]) -> str:
    """The throughput table, the disk sizes and the peak RSS, as text."""
    disk, memory = result["disk"], result["memory"]
    mib = 2**20
    lines = [format_table(result["rows"]), "",
             f"disk, {disk['images']} JPEGs: files {disk['jpeg_files'] / mib:.1f} MiB, encoded shards "
             f"{disk['encoded_shards'] / mib:.1f} MiB, decoded shards ({disk['decoded_side']}x{disk['decoded_side']}) "
             f"{disk['decoded_shards'] / mib:.1f} MiB "
             f"({disk['decoded_shards'] / disk['encoded_shards']:.1f}x encoded), "
             f"re-encoded to max_side {disk['decoded_side']}: {disk['max_side_shards'] / mib:.1f} MiB",
             ""]
    lines.append(f"peak RSS of a child training one epoch (batch 64, crops {memory['size']}) over "
                 f"{memory['dataset_bytes'] / mib:.0f} MiB of encoded shards ({memory['samples']} images): "
                 f"{memory['peak_rss'] / mib:.0f} MiB; RSS at the epoch's start {memory['start_rss'] / mib:.0f} MiB "
                 f"(torch and batchfit imported, model built); dataset / peak RSS = "
                 f"{memory['dataset_bytes'] / memory['peak_rss']:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/run.py --only images [options]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, help="generated JPEG files (default 600; --quick 200)")
    parser.add_argument("--size", type=int, default=112, help="side of the crops")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 7; --quick 3)")
    parser.add_argument("--rss-mb", type=int, help="encoded shards for the RSS epoch, MiB (default 1024; --quick 256)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", help="where to write the temporary files (default: the system's temp folder)")
    args = parser.parse_args(argv)
    result = run(args.quick, args.images, args.size, args.repeats, args.rss_mb, args.dir)
    print(format_report(result))
