"""batchfit: mini-batch training for PyTorch that measures batch size and learning rate.

The public API is everything in ``__all__``; modules not listed here are private.
"""

from .data.batcher import Batcher
from .data.sources import ArraySource, DatasetSource
from .errors import BatchfitError, CheckpointError, DistributedError, NonFiniteLossError, ShardError
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
    "NonFiniteLossError",
    "ShardError",
    "Trainer",
]

__version__ = "0.1.0"
