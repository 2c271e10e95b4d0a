"""History: one record per step and one per epoch, kept as columns."""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np
import torch

from ..core.durable import atomic_write

logger = logging.getLogger("batchfit")

STEP_FIELDS = ("step", "epoch", "samples", "batch_size", "loss", "lr", "seconds")
# Losses held as tensors are read back once this many are pending: one device sync per that many
# steps, and memory that does not grow with the length of an epoch (a 0-d tensor costs ~600 bytes).
READBACK_EVERY = 1024


class History:
    """What happened during :meth:`Trainer.fit`.

    A stream's run keeps the newest step rows only (:attr:`keep`; the older ones are in the
    ``CSVLogger``'s ``metrics.csv``), so that its memory and checkpoints do not grow with its age.

    ``steps`` is a list of per-step records (step, epoch, samples seen, batch size, loss, lr,
    seconds since the start of training, plus any extra per-step columns such as the noise
    scale); ``epochs`` is a list of per-epoch records (train loss and validation metrics).
    Losses may be held as device tensors while training runs so that no step waits for the
    device; they are read back in bulk when the history is looked at.
    """

    def __init__(self) -> None:
        self._columns: dict[str, list[Any]] = {name: [] for name in STEP_FIELDS}
        self._pending_from = 0  # losses before this index are already floats
        self.epochs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # decisions such as batch-size changes
        self.validations: list[dict[str, Any]] = []  # every `val_every` steps: step, epoch, val_* metrics
        # Step rows kept in memory (None: all). A stream keeps the newest ones, so that memory and checkpoints
        # stay flat; before older rows are dropped, ``before_drop`` hooks (the CSVLogger) write them out.
        self.keep: int | None = None
        self.dropped = 0  # step rows dropped from the front
        self.before_drop: list[Callable[[History], None]] = []

    def __len__(self) -> int:
        """Step rows held (the newest ones when :attr:`keep` bounds them)."""
        return len(self._columns["step"])

    @property
    def total(self) -> int:
        """Step rows recorded, those dropped from memory included (the position of the next row)."""
        return self.dropped + len(self)

    def _drop_old(self) -> None:
        """Keep the newest :attr:`keep` rows, after the ``before_drop`` hooks had a last look at the older ones."""
        assert self.keep is not None
        count = len(self) - self.keep
        self.losses()
        for hook in self.before_drop:
            hook(self)
        for column in self._columns.values():
            del column[:count]
        self._pending_from = max(0, self._pending_from - count)
        self.dropped += count

    def add_step(self, step: int, epoch: int, samples: int, batch_size: int, loss: Any, lr: float,
                 seconds: float, **extra: Any) -> None:
        """Append one step's record; ``loss`` may be a float or a 0-d tensor."""
        columns = self._columns
        rows = len(columns["step"])
        columns["step"].append(step)
        columns["epoch"].append(epoch)
        columns["samples"].append(samples)
        columns["batch_size"].append(batch_size)
        columns["loss"].append(loss)
        columns["lr"].append(lr)
        columns["seconds"].append(seconds)
        for name, value in extra.items():
            column = columns.get(name)
            if column is None:
                column = columns[name] = [math.nan] * rows
            column.append(value)
        if len(columns) != len(STEP_FIELDS) + len(extra):  # a column this step did not give: NaN in it
            for column in columns.values():
                if len(column) <= rows:
                    column.append(math.nan)
        if len(columns["loss"]) - self._pending_from >= READBACK_EVERY:
            self.losses()
        if self.keep is not None and len(columns["step"]) > self.keep + max(1, self.keep // 4):
            self._drop_old()  # in chunks of a quarter of what is kept: dropping copies the columns

    def losses(self) -> list[float]:
        """Every step's loss as floats (reads pending device values back in one transfer)."""
        losses = self._columns["loss"]
        pending = losses[self._pending_from :]
        device = next((v.device for v in pending if isinstance(v, torch.Tensor)), None)
        if device is not None:
            # Stacked where they live, then copied once (one device sync for all of them).
            values = torch.stack([v.detach().float().reshape(()) if isinstance(v, torch.Tensor)
                                  else torch.tensor(float(v), device=device) for v in pending]).tolist()
            losses[self._pending_from :] = values
        self._pending_from = len(losses)
        return losses

    def column(self, name: str) -> list[Any]:
        """One per-step column by name."""
        if name == "loss":
            return self.losses()
        return self._columns[name]

    @property
    def steps(self) -> list[dict[str, Any]]:
        """Per-step records as dicts."""
        self.losses()
        names = list(self._columns)
        return [dict(zip(names, row)) for row in zip(*(self._columns[n] for n in names))]

    def record(self, index: int) -> dict[str, Any]:
        """One step's record, e.g. ``record(-1)`` for the latest (without building all of ``steps``)."""
        if self._columns["loss"] and isinstance(self._columns["loss"][index], torch.Tensor):
            self.losses()
        return {name: column[index] for name, column in self._columns.items()}

    def mean_loss(self, epoch: int) -> float:
        """Mean training loss over the steps of ``epoch`` (NaN when it has none)."""
        values = [v for v, e in zip(self.losses(), self._columns["epoch"]) if e == epoch]
        return sum(values) / len(values) if values else math.nan

    def add_event(self, **event: Any) -> None:
        """Record a decision made during training (for example a batch-size change)."""
        self.events.append(event)

    def columns(self) -> list[str]:
        """The names of the per-step columns, in order."""
        return list(self._columns)

    def to_csv(self, path: str | os.PathLike[str], epochs_path: str | os.PathLike[str] | None = None) -> None:
        """Write the per-step records to ``path`` (and per-epoch records to ``epochs_path``).

        When older rows were dropped (:attr:`keep`), the file's first :attr:`dropped` rows — written there
        before they were dropped (the ``CSVLogger``) — are kept ahead of the rows held, under the current
        columns; a file that holds fewer is completed with what is held (and a warning).
        """
        if not self.dropped:
            _write_csv(path, self.steps, list(self._columns))
        else:
            names = list(self._columns)

            def write(handle: IO[Any]) -> None:
                writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
                writer.writeheader()
                kept = 0
                if os.path.exists(path):
                    with open(path, newline="") as old:
                        for row in itertools.islice(csv.DictReader(old), self.dropped):
                            writer.writerow(row)
                            kept += 1
                if kept < self.dropped:
                    logger.warning("%s held %d of the %d step rows before those the history keeps; they are lost",
                                   path, kept, self.dropped)
                writer.writerows(self.record(index) for index in range(len(self)))

            atomic_write(path, write, text=True)
        if epochs_path is not None and self.epochs:
            write_records(epochs_path, self.epochs)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Write a PNG of loss against step and samples seen, the lr, and validation metrics (of a stream:
        the prequential metrics against events seen, the lag and the lr)."""
        from .stream_plots import is_stream_history, plot_stream_history

        if is_stream_history(self):
            plot_stream_history(self, path)
            return
        from .plots import plot_history

        plot_history(self, path)

    def state_dict(self) -> dict[str, Any]:
        """Numeric columns as one tensor each, the rest as plain lists: safe for ``torch.load(weights_only=True)``.

        A checkpoint holds the whole history, so a column of a million steps is saved as one
        block of 8 MB rather than as a million objects.
        """
        self.losses()
        return {"columns": {k: _packed(v) for k, v in self._columns.items()}, "epochs": list(self.epochs),
                "events": list(self.events), "validations": list(self.validations), "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore records saved by :meth:`state_dict` (also those saved as plain lists)."""
        self._columns = {k: v.tolist() if isinstance(v, torch.Tensor) else list(v)
                         for k, v in state["columns"].items()}
        self._pending_from = len(self._columns["loss"])
        self.epochs = list(state["epochs"])
        self.events = list(state["events"])
        self.validations = list(state.get("validations", []))
        self.dropped = int(state.get("dropped", 0))


def _packed(column: list[Any]) -> torch.Tensor | list[Any]:
    """``column`` as an int64 or float64 tensor when it holds only ints or only numbers (exact both ways)."""
    kinds = set(map(type, column))
    if kinds <= {int}:
        return torch.from_numpy(np.array(column, dtype=np.int64))  # through NumPy: 4x faster than torch.tensor
    if kinds <= {int, float}:
        return torch.from_numpy(np.array(column, dtype=np.float64))
    return list(column)


def _epoch_key_order(key: str) -> tuple[int, str]:
    first = ("epoch", "loss", "seconds", "steps", "samples")
    return (first.index(key), key) if key in first else (len(first), key)


def write_records(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """Write records (epochs, validations) as a CSV whose columns are every key any record has."""
    names = sorted({k for record in records for k in record}, key=_epoch_key_order)
    _write_csv(path, records, names)


def _write_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    def write(handle: IO[Any]) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(names), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, text=True)
