"""batchfit: mini-batch training for PyTorch that measures batch size and learning rate.

The public API is everything in ``__all__`` and the namespaces ``bf.text``, ``bf.streams``,
``bf.shards``, ``bf.callbacks`` and ``bf.images``; modules not reached from here are private. Names
from before the namespaces (``bf.StreamSource``, ``bf.load_text_model``, ``bf.CSVLogger``, ...) are
still importable from the top, outside ``__all__``. Layers, each
importing only from the ones before it: ``errors`` ← ``core`` ← ``data``, ``distributed`` ←
``measure`` ← ``train`` ← ``report`` ← ``config``/``run``/``models``/``demo``/``bench`` ← ``cli``.
"""

from . import callbacks as callbacks  # bf.callbacks: the loop's callbacks
from . import shards as shards  # bf.shards: shard folders (write, verify, ShardSource)
from . import streams as streams  # bf.streams: event streams, Redis, dead letters, snapshots, hashed tables
from . import text as text  # bf.text: pretrained text models, tokenised shards, corpora
from .callbacks import CSVLogger as CSVLogger
from .callbacks import EarlyStopping as EarlyStopping
from .callbacks import ModelCheckpoint as ModelCheckpoint
from .callbacks import TensorBoardLogger as TensorBoardLogger
from .data import images as images  # bf.images: image folders as encoded shards, transforms, ImageSource
from .data.batcher import Batcher
from .data.shards import ShardSource, write_shards
from .data.sources import ArraySource, DatasetSource
from .data.transforms import ToFloat
from .errors import (
    BatchfitError,
    CheckpointError,
    ConfigError,
    DistributedError,
    InputError,
    NonFiniteLossError,
    ShardError,
    StreamError,
)
from .measure.lr import adascale_gain, scale_lr, warmup
from .measure.memory import find_micro_batch_size
from .measure.noise import NoiseScale, NoiseScaleTracker, estimate_noise_scale
from .measure.range_test import LRRangeResult, lr_range_test
from .report import TuneReport, tune
from .shards import verify as verify_shards  # noqa: F401
from .streams import DeadLetter as DeadLetter
from .streams import EventConsumer as EventConsumer
from .streams import PublishSnapshots as PublishSnapshots
from .streams import RedisStream as RedisStream
from .streams import StreamSource as StreamSource
from .streams import load_snapshot as load_snapshot
from .text import find_micro_batch_tokens as find_micro_batch_tokens
from .text import load_text_model as load_text_model
from .text import load_tokenizer as load_tokenizer
from .text import prepare_corpus as prepare_corpus
from .text import write_text_shards as write_text_shards
from .train.callbacks import Callback
from .train.history import History
from .train.options import TrainerOptions
from .train.saving import load_model
from .train.trainer import Trainer

__all__ = [
    "ArraySource",
    "Batcher",
    "BatchfitError",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "DatasetSource",
    "DistributedError",
    "History",
    "InputError",
    "LRRangeResult",
    "NoiseScale",
    "NoiseScaleTracker",
    "NonFiniteLossError",
    "ShardError",
    "ShardSource",
    "StreamError",
    "ToFloat",
    "Trainer",
    "TrainerOptions",
    "TuneReport",
    "adascale_gain",
    "estimate_noise_scale",
    "find_micro_batch_size",
    "load_model",
    "lr_range_test",
    "scale_lr",
    "tune",
    "warmup",
    "write_shards",
]

__version__ = "0.1.0"

# Every exported object says it lives in `batchfit` (as httpx does): what users import is where
# reprs, tracebacks and docs point, whatever module defines it.
for _name in __all__:
    _object = globals()[_name]
    if getattr(_object, "__module__", "batchfit").startswith("batchfit."):
        _object.__module__ = "batchfit"
del _name, _object
