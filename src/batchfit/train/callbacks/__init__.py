"""Callbacks, one per file: the protocol (:mod:`.base`) and the built-in ones."""

from .base import HOOKS, Callback, overriding
from .early_stopping import EarlyStopping
from .model_checkpoint import ModelCheckpoint

__all__ = ["HOOKS", "Callback", "EarlyStopping", "ModelCheckpoint", "overriding"]
