"""Callbacks, one per file: the protocol (:mod:`.base`) and the built-in ones."""

from .base import HOOKS, Callback, overriding
from .csv_logger import CSVLogger
from .early_stopping import EarlyStopping
from .model_checkpoint import ModelCheckpoint
from .tensorboard import TensorBoardLogger

__all__ = ["HOOKS", "CSVLogger", "Callback", "EarlyStopping", "ModelCheckpoint", "TensorBoardLogger", "overriding"]
