"""Metrics as CSV files that grow while the run goes, so they can be followed (``tail -f``) or plotted live."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import expected
from ..history import write_records
from .base import Callback

if TYPE_CHECKING:
    from ..history import History
    from ..trainer import Trainer


class CSVLogger(Callback):
    """Writes ``metrics.csv`` (one row per step), ``epochs.csv`` and ``validation.csv`` into ``folder``.

    Step rows are appended and flushed every few seconds (the trainer's ``on_log``), at each
    epoch end and at the end of ``fit``; the epoch and validation files are rewritten whole
    (atomically) when they change. A resumed run starts the files again from its history, so
    they always match the run's records. A stream's history keeps only its newest rows
    (:attr:`History.keep <batchfit.History>`): the older ones are written here before they are dropped,
    and a resumed run keeps them from the file (its first ``history.dropped`` rows).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        if not isinstance(folder, (str, os.PathLike)):
            raise expected("folder", "a folder path", folder)
        self.folder = Path(folder)
        self.steps_path = self.folder / "metrics.csv"
        self.epochs_path = self.folder / "epochs.csv"
        self.validation_path = self.folder / "validation.csv"
        self._written = 0
        self._columns: list[str] = []
        self._epochs = self._validations = -1

    def on_fit_begin(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rewrite(trainer.history)
        self._epochs = self._validations = -1
        if self._append not in trainer.history.before_drop:
            trainer.history.before_drop.append(self._append)

    def on_log(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            self._append(trainer.history)

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        if trainer.dist.is_main:
            self._append(trainer.history)
            self._small_files(trainer.history)

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        if trainer.dist.is_main:
            self._append(history)
            self._small_files(history)

    def _rewrite(self, history: History) -> None:
        history.to_csv(self.steps_path)  # the rows the history dropped are kept from the file
        self._written, self._columns = history.total, history.columns()

    def _append(self, history: History) -> None:
        if history.columns() != self._columns:  # a column appeared (e.g. the noise scale): start again
            self._rewrite(history)
            return
        if history.total == self._written:
            return
        rows = [history.record(index) for index in range(max(0, self._written - history.dropped), len(history))]
        with open(self.steps_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._columns, extrasaction="ignore").writerows(rows)
            handle.flush()
        self._written = history.total

    def _small_files(self, history: History) -> None:
        if history.epochs and len(history.epochs) != self._epochs:
            write_records(self.epochs_path, history.epochs)
            self._epochs = len(history.epochs)
        if history.validations and len(history.validations) != self._validations:
            write_records(self.validation_path, history.validations)
            self._validations = len(history.validations)
