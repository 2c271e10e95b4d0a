"""batchfit: mini-batch training for PyTorch that measures batch size and learning rate.

The public API is everything in ``__all__``; modules not listed here are private.
"""

from .data.batcher import Batcher
from .data.shards import ShardSource, write_shards
from .data.shards import verify as verify_shards
from .data.sources import ArraySource, DatasetSource
from .errors import BatchfitError, CheckpointError, DistributedError, NonFiniteLossError, ShardError
from .measure.lr import adascale_gain, scale_lr, warmup
from .measure.memory import find_micro_batch_size
from .measure.noise import NoiseScale, NoiseScaleTracker, estimate_noise_scale
from .measure.range_test import LRRangeResult, lr_range_test
from .report import TuneReport, tune
from .train.callbacks import Callback, EarlyStopping
from .train.history import History
from .train.trainer import Trainer

__all__ = [
    "ArraySource",
    "Batcher",
    "BatchfitError",
    "Callback",
    "CheckpointError",
    "DatasetSource",
    "DistributedError",
    "EarlyStopping",
    "History",
    "LRRangeResult",
    "NoiseScale",
    "NoiseScaleTracker",
    "NonFiniteLossError",
    "ShardError",
    "ShardSource",
    "Trainer",
    "TuneReport",
    "adascale_gain",
    "estimate_noise_scale",
    "find_micro_batch_size",
    "lr_range_test",
    "scale_lr",
    "tune",
    "verify_shards",
    "warmup",
    "write_shards",
]

__version__ = "0.1.0"
