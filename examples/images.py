"""Train a ResNet on an image folder through encoded shards, with a measured batch size.

    python examples/images.py                    # generated shapes: 4 classes of JPEGs of varied sizes
    python examples/images.py --data digits      # scikit-learn's handwritten digits, upscaled, as PNG files
    python examples/images.py --data photos      # crops of the two photographs scikit-learn ships, as JPEG
    python examples/images.py --folder PATH      # your own folder: one sub-folder of images per class
    python examples/images.py --prepare          # only write the files and shards examples/images.toml reads

The steps: an image folder (one sub-folder per class) -> shards of the encoded files (labels and
class names kept) -> batches decoded, cropped, flipped and normalised in worker processes ->
`batch_size="auto"` (measured from the gradient noise scale and the step time) -> a progress
bar, history.csv and history.png. The model is torchvision's resnet18 where torchvision imports,
else batchfit's small built-in ResNet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import batchfit as bf
from batchfit.models import resnet

HERE = Path(__file__).parent / "data"


def shapes(root: Path, per_class: int) -> tuple[Path, Path]:
    """Generated JPEGs: a shape and colour per class on textured noise, 64 to 160 pixels a side."""
    train = bf.images.make_image_folder(root / "train", per_class, classes=4, seed=0)
    val = bf.images.make_image_folder(root / "val", max(8, per_class // 5), classes=4, seed=1)
    return train, val


def digits(root: Path) -> tuple[Path, Path]:
    """scikit-learn's 8x8 handwritten digits, upscaled to 32 to 64 pixels, as PNG files (80% / 20%)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(0)
    for number, (pixels, label) in enumerate(zip(data.images, data.target)):
        part = "val" if number % 5 == 0 else "train"
        folder = root / part / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(32, 65))
        image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
        image.convert("RGB").save(folder / f"{number:05d}.png")
    return root / "train", root / "val"


def photos(root: Path, per_class: int) -> tuple[Path, Path]:
    """Random crops (60 to 200 pixels) of scikit-learn's two photographs, one class each, as JPEG files."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    rng = np.random.default_rng(0)
    for name, pixels in zip(("china", "flower"), sample.images):
        photo = Image.fromarray(pixels)
        for part, count in (("train", per_class), ("val", max(8, per_class // 5))):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for number in range(count):
                w, h = (int(v) for v in rng.integers(60, 201, 2))
                left, top = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
                photo.crop((left, top, left + w, top + h)).save(root / part / name / f"{number:05d}.jpg", quality=90)
    return root / "train", root / "val"


def prepare(data: str, folder: str | None, per_class: int) -> tuple[Path, Path | None]:
    """Image folders -> shard folders (written once; delete examples/data/*_shards to write them again)."""
    if folder is not None:
        train_folder, val_folder, name = Path(folder), None, Path(folder).name
    else:
        name = data
        root = HERE / data
        makers = {"shapes": lambda: shapes(root, per_class), "digits": lambda: digits(root),
                  "photos": lambda: photos(root, per_class)}
        train_folder, val_folder = makers[data]() if not (root / "train").exists() else (root / "train", root / "val")
    shards = HERE / f"{name}_shards"
    for part, source_folder in (("train", train_folder), ("val", val_folder)):
        if source_folder is not None and not (shards / part).exists():
            bf.images.write_image_shards(source_folder, shards / part, max_side=256, on_corrupt="skip")
    return shards / "train", (shards / "val") if val_folder is not None else None


def model_for(classes: int, size: int) -> torch.nn.Module:
    try:  # torchvision is optional: where it is missing or broken, the built-in ResNet
        import torchvision

        print("model: torchvision resnet18")
        return torchvision.models.resnet18(num_classes=classes)
    except Exception:  # noqa: BLE001 (an incompatible torchvision fails with RuntimeError, not ImportError)
        print("model: batchfit's built-in ResNet (torchvision is not importable)")
        return resnet(in_channels=3, num_classes=classes, widths=(32, 64, 128), blocks=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("shapes", "digits", "photos"), default="shapes")
    parser.add_argument("--folder", help="your own image folder (one sub-folder per class) instead of --data")
    parser.add_argument("--per-class", type=int, default=300, help="generated images per class")
    parser.add_argument("--size", type=int, default=64, help="side of the crops the model sees")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="processes decoding and augmenting batches")
    parser.add_argument("--out", default="runs/images")
    parser.add_argument("--prepare", action="store_true", help="only write the image files and shards")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_shards, val_shards = prepare(args.data, args.folder, args.per_class)
    if args.prepare:
        print(f"shards in {train_shards.parent}; now: batchfit train examples/images.toml "
              "(it reads data/shapes_shards: edit data.train / data.val for other shards)")
        return
    # Digits are not mirror images of one another, and a small crop of one loses the digit.
    digits = args.data == "digits" and args.folder is None
    augment = bf.images.train_transform(args.size, scale=(0.5 if digits else 0.25, 1.0), flip=not digits)
    train = bf.images.ImageSource(train_shards, augment)
    val = None if val_shards is None else bf.images.ImageSource(val_shards, bf.images.eval_transform(args.size))
    classes = train.classes or []
    print(f"{len(train)} training images, classes {classes}")
    model = model_for(len(classes), args.size)
    trainer = bf.Trainer(model, torch.nn.functional.cross_entropy, torch.optim.Adam(model.parameters(), lr=3e-3),
                         batch_size="auto", max_batch_size=256, workers=args.workers, progress=True,
                         checkpoint_dir=Path(args.out) / "checkpoints", checkpoint_every=100)
    history = trainer.fit(train, epochs=args.epochs, val=val, resume=True)
    out = Path(args.out)
    history.to_csv(out / "history.csv")
    history.plot(out / "history.png")
    print(f"batch size {trainer.batcher.batch_size if trainer.batcher else '?'}; last epoch: {history.epochs[-1]}")
    print(f"wrote {out}/history.csv and {out}/history.png")


if __name__ == "__main__":
    main()
