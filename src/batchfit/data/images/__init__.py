"""Images beyond RAM: image folders as encoded shards, decoded and augmented per batch.

Reached as ``bf.images``::

    import batchfit as bf

    bf.images.write_image_shards("photos/train", "shards/train")   # encoded bytes + labels + class names
    train = bf.images.ImageSource("shards/train", bf.images.train_transform(224))
    val = bf.images.ImageSource("shards/val", bf.images.eval_transform(224))
    trainer = bf.Trainer(model, loss_fn, optimizer, batch_size=256, workers=4)
    trainer.fit(train, epochs=90, val=val)

A shard folder of images holds each file's encoded bytes (JPEG, PNG, WebP as they were, or
re-encoded to a maximum side) as a variable-length ``uint8`` array, with ``int64`` labels and
the class names (``ShardSource.classes``). An :class:`ImageSource` decodes and augments whole
batches where the :class:`~batchfit.Batcher` gathers them: in its worker processes with
``workers=n``. Augmentation is a pure function of (seed, epoch, sample index), so a resumed run
sees the same crops and flips as one that never stopped, whatever the workers, batch size or
prefetch.
"""

from .folder import ON_CORRUPT, write_image_shards
from .source import ImageSource
from .synthetic import make_image_folder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, decode, eval_transform, train_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSource",
    "ImageTransform",
    "ON_CORRUPT",
    "decode",
    "eval_transform",
    "make_image_folder",
    "train_transform",
    "write_image_shards",
]
