"""Publishing model snapshots for a serving process, atomically, independent of checkpoints.

Every ``every_steps`` steps or ``every_seconds`` seconds (and when ``fit`` ends) the model's
weights are written to ``snapshot-<step>.pt`` (temporary file, fsync, rename), then a small
pointer file ``LATEST`` (JSON: file, step, samples, time; written the same way) names the newest.
A reader (:func:`load_snapshot`) reads the pointer, then the file it names: it never sees a
half-written snapshot, and older snapshots are pruned only after the pointer has moved on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from ...core.durable import atomic_write, failed_write
from ...errors import InputError, check_positive_int, expected
from .base import Callback

if TYPE_CHECKING:
    from ..history import History
    from ..trainer import Trainer

POINTER = "LATEST"


class PublishSnapshots(Callback):
    """Publish the model's weights to ``folder`` every ``every_steps`` steps and/or ``every_seconds`` seconds.

    ``keep`` snapshots stay on disk (a reader that has just read the pointer still finds its file).
    ``published`` lists what was written in this process: ``{"step", "samples", "time", "file"}``.
    """

    def __init__(self, folder: str | os.PathLike[str], every_steps: int | None = None,
                 every_seconds: float | None = None, keep: int = 3) -> None:
        if not isinstance(folder, (str, os.PathLike)):
            raise expected("folder", "a folder path", folder)
        if every_steps is None and every_seconds is None:
            raise expected("every_steps", "a positive integer (or every_seconds a positive number)", None)
        if every_steps is not None:
            check_positive_int("every_steps", every_steps)
        if every_seconds is not None and (isinstance(every_seconds, bool) or
                                          not isinstance(every_seconds, (int, float)) or not every_seconds > 0):
            raise expected("every_seconds", "a positive number of seconds or None", every_seconds)
        check_positive_int("keep", keep)
        self.folder = Path(folder)
        self.every_steps, self.every_seconds, self.keep = every_steps, every_seconds, keep
        self.published: list[dict[str, Any]] = []
        self._last_step = -1
        self._last_time = time.monotonic()

    def on_fit_begin(self, trainer: Trainer) -> None:
        """Start the clock of ``every_seconds``."""
        self._last_time = time.monotonic()

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Publish when a step or time interval is due."""
        step = int(record["step"])
        due = self.every_steps is not None and step % self.every_steps == 0
        due = due or self.every_seconds is not None and time.monotonic() - self._last_time >= self.every_seconds
        if due:
            self.publish(trainer.module, step, int(record["samples"]))

    def on_fit_end(self, trainer: Trainer, history: History) -> None:
        """Publish the final weights (unless this step is published already)."""
        if trainer.step != self._last_step:
            self.publish(trainer.module, trainer.step, trainer.samples_seen)

    def publish(self, model: torch.nn.Module, step: int, samples: int) -> Path:
        """Write one snapshot and move the pointer to it; returns the snapshot's path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"snapshot-{step:09d}.pt"
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        try:
            path = atomic_write(self.folder / name, lambda handle: torch.save({"model": weights, "step": step,
                                                                             "samples": samples}, handle))
        except (OSError, RuntimeError) as error:  # a full disk: named, and LATEST still names the last good one
            failure = failed_write(error, self.folder / name, "snapshot")
            if failure is None:
                raise
            raise failure from error
        info = {"file": name, "step": step, "samples": samples, "time": time.time()}

        def write_pointer(handle: IO[Any]) -> None:
            handle.write(json.dumps(info))

        atomic_write(self.folder / POINTER, write_pointer, text=True)
        self.published.append(info)
        self._last_step, self._last_time = step, time.monotonic()
        snapshots = sorted(self.folder.glob("snapshot-*.pt"))
        for old in snapshots[: max(0, len(snapshots) - self.keep)]:
            if old.name != name:
                old.unlink(missing_ok=True)
        return path

    def state_dict(self) -> dict[str, Any]:
        """The step last published."""
        return {"last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._last_step = int(state.get("last_step", -1))


def _read_pointer(folder: Path) -> dict[str, Any]:
    """The ``LATEST`` pointer of ``folder``, checked: JSON naming a snapshot file inside ``folder``."""
    pointer = folder / POINTER
    try:
        info = json.loads(pointer.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no snapshot published in {folder} yet (no {POINTER} file)") from None
    except (ValueError, OSError) as error:  # JSONDecodeError, UnicodeDecodeError, a folder named LATEST
        raise InputError(f"{pointer} is not a snapshot pointer (JSON written by PublishSnapshots): "
                            f"{type(error).__name__}: {error}") from None
    name = info.get("file") if isinstance(info, dict) else None
    if not isinstance(name, str) or not name:
        raise InputError(f"{pointer} names no snapshot file (expected JSON with \"file\"). Received: {info!r}")
    if Path(name).name != name or name in (".", "..") or not name.endswith(".pt"):
        raise InputError(f"{pointer} names {name!r}, which is not a snapshot file in {folder}: a pointer "
                            f"never leaves its folder")
    return info


def load_snapshot(folder: str | os.PathLike[str], map_location: Any = "cpu",
                  attempts: int = 5) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The newest published snapshot in ``folder``: ``(model state dict, info)``.

    ``info`` is the pointer's ``{"file", "step", "samples", "time"}``. The file is loaded with
    ``torch.load(weights_only=True)``. When the writer prunes the named file between the two reads,
    the pointer is read again (up to ``attempts`` times).
    """
    folder = Path(folder)
    for _ in range(attempts):
        info = _read_pointer(folder)
        path = folder / info["file"]
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            continue  # pruned after the pointer moved on: read the pointer again
        except Exception as error:  # noqa: BLE001 - garbage, a truncated file, or one that is not weights only
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InputError(f"snapshot {path} (named by {folder / POINTER}) cannot be read as weights: "
                                f"{type(error).__name__}: {first}") from None
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise InputError(f"snapshot {path} (named by {folder / POINTER}) is not a snapshot written by "
                                f"PublishSnapshots (no 'model' weights in it)")
        return state["model"], info
    raise InputError(f"the snapshot named by {folder / POINTER} kept disappearing ({attempts} attempts): "
                        f"raise PublishSnapshots(keep=...)")
