"""batchfit: mini-batch training for PyTorch that measures batch size and learning rate.

The public API is everything in ``__all__``; modules not listed here are private. Layers, each
importing only from the ones before it: ``errors`` ← ``core`` ← ``data``, ``distributed`` ←
``measure`` ← ``train`` ← ``report`` ← ``config``/``run``/``models``/``demo``/``bench`` ← ``cli``.
"""

from .data import images as images  # bf.images: image folders as encoded shards, transforms, ImageSource
from .data.batcher import Batcher
from .data.redis_streams import RedisStream
from .data.shards import ShardSource, write_shards
from .data.shards import verify as verify_shards
from .data.sources import ArraySource, DatasetSource
from .data.streams import DeadLetter, EventConsumer, StreamSource
from .data.text import load_tokenizer, write_text_shards
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
from .measure.memory import find_micro_batch_size, find_micro_batch_tokens
from .measure.noise import NoiseScale, NoiseScaleTracker, estimate_noise_scale
from .measure.range_test import LRRangeResult, lr_range_test
from .report import TuneReport, tune
from .train.callbacks import Callback, CSVLogger, EarlyStopping, ModelCheckpoint, TensorBoardLogger
from .train.callbacks.snapshots import PublishSnapshots, load_snapshot
from .train.history import History
from .train.options import TrainerOptions
from .train.saving import load_model
from .train.trainer import Trainer
from .workloads.text import load_text_model, prepare_corpus

__all__ = [
    "ArraySource",
    "Batcher",
    "BatchfitError",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "DatasetSource",
    "DeadLetter",
    "DistributedError",
    "EarlyStopping",
    "EventConsumer",
    "History",
    "InputError",
    "LRRangeResult",
    "ModelCheckpoint",
    "NoiseScale",
    "NoiseScaleTracker",
    "NonFiniteLossError",
    "PublishSnapshots",
    "RedisStream",
    "ShardError",
    "ShardSource",
    "StreamError",
    "StreamSource",
    "TensorBoardLogger",
    "ToFloat",
    "Trainer",
    "TrainerOptions",
    "TuneReport",
    "adascale_gain",
    "estimate_noise_scale",
    "find_micro_batch_size",
    "find_micro_batch_tokens",
    "load_model",
    "load_snapshot",
    "load_text_model",
    "load_tokenizer",
    "lr_range_test",
    "prepare_corpus",
    "scale_lr",
    "tune",
    "verify_shards",
    "warmup",
    "write_shards",
    "write_text_shards",
]

__version__ = "0.1.0"

# Every exported object says it lives in `batchfit` (as httpx does): what users import is where
# reprs, tracebacks and docs point, whatever module defines it.
for _name in __all__:
    _object = globals()[_name]
    if getattr(_object, "__module__", "batchfit").startswith("batchfit."):
        _object.__module__ = "batchfit"
del _name, _object
