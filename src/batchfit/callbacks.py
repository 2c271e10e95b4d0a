"""Callbacks of the training loop: the base class and the ones that ship.

Reached as ``bf.callbacks`` (``bf.Callback`` is also at the top)::

    import batchfit as bf

    trainer = bf.Trainer(model, loss_fn, optimizer, callbacks=[
        bf.callbacks.EarlyStopping(patience=3), bf.callbacks.CSVLogger("runs/a")])

``bf.CSVLogger``, ``bf.EarlyStopping``, ``bf.ModelCheckpoint`` and ``bf.TensorBoardLogger`` still work.
"""

from .train.callbacks import Callback, CSVLogger, EarlyStopping, ModelCheckpoint, TensorBoardLogger

__all__ = ["CSVLogger", "Callback", "EarlyStopping", "ModelCheckpoint", "TensorBoardLogger"]
