"""What the one loop needs from what it trains on, and what every ``fit`` does around it.

The loop (:meth:`~batchfit.Trainer.fit`) is written once, for data sets and streams alike; what
differs between them is a :class:`Feed` — where the batches come from and when one closes, what
a step trains on and what else it records, what a checkpoint holds besides the trainer's own
state. Around the loop, :func:`session` holds the checkpoint folder's lock and, in a distributed
run, makes a failing rank leave the process group so that the others stop at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ..core.step import StepResult
from ..distributed import DistContext
from ..errors import expected
from .checkpoint import FolderLock
from .progress import Progress

# Seconds between two calls of the callbacks' on_log (loggers), each after one readback of the losses.
LOG_EVERY = 2.0


class Mark(Protocol):
    """Where a feed stands after a batch; the loop reads only the batch's global size."""

    @property
    def batch_size(self) -> int:
        """Samples of the batch over all ranks."""


class Feed(Protocol):
    """What the loop trains on: the epochs of a data set (:class:`~.epochs.EpochFeed`) or one pass over a
    stream (:class:`~.stream_loop.StreamFeed`).

    Each step trains on a *batch* (this rank's part of it; a stream's rank may hold none) and its
    *mark*: where the feed stands after it (a data set's position), with ``mark.batch_size``, the
    batch's global size over all ranks. The loop passes both back to the feed without looking inside.
    """

    @property
    def epoch(self) -> int:
        """The epoch being trained, counted from 1 as users see it."""

    @property
    def open_ended(self) -> bool:
        """A stream: each fit is one "epoch" that ends when the stream, a budget or a signal says."""

    @property
    def resume_keys(self) -> tuple[str, ...]:
        """The settings of ``config`` a checkpoint must match to be resumed."""

    def start_fresh(self) -> None:
        """Begin a run that resumes nothing."""

    def more(self) -> bool:
        """Whether to train another epoch (asked before each)."""

    def nothing_left(self) -> str | None:
        """After a resume: why there is nothing to train (``None``: there is)."""

    def start_epoch(self, progress: Progress, now: float) -> int:
        """Set the epoch's lr and open its bar; returns the steps already done in it (a resume)."""

    def batches(self) -> Iterator[tuple[Any, Mark]]:
        """The epoch's batches, each with its mark."""

    def lr_batch_size(self, size: int) -> int:
        """The batch size a dynamic lr is computed for, at a step of a batch of ``size``."""

    def step(self, batch: Any, size: int, stop_requested: bool) -> StepResult:
        """THE step on ``batch`` of ``size`` samples over all ranks (:meth:`~batchfit.core.step.Step.step`);
        ``stop_requested``: a stop asked before this step, which a distributed run agrees on inside it."""

    def skipped(self, mark: Any) -> None:
        """The step was skipped (a non-finite loss): its batch is used up all the same."""

    def columns(self, batch: Any, mark: Any, result: StepResult) -> dict[str, Any]:
        """After an update, once the step is counted: the feed's own bookkeeping; extra history columns."""

    def end_steps(self) -> None:
        """After the epoch's last step (or a stop): give back what was read but not trained on."""

    def epoch_done(self) -> bool:
        """Whether the epoch ran to its end (else the fit stopped inside it)."""

    def epoch_record(self, epoch: int) -> dict[str, Any]:
        """The epoch's training loss (``loss``) and the feed's own columns of the epoch record."""

    def next_epoch(self) -> None:
        """Move on to the next epoch (after its record)."""

    def release(self) -> None:
        """At an epoch's end without a checkpoint folder: nothing durable to wait for (a stream acknowledges)."""

    def shown_loss(self) -> float:
        """The loss the progress bar shows."""

    def shown_note(self) -> str:
        """What else the progress bar shows after the samples/s (a stream: its dead letters), or ``""``."""

    def before_checkpoint(self) -> None:
        """Collect what the checkpoint holds of every rank (a collective in a distributed run)."""

    def after_checkpoint(self) -> None:
        """The checkpoint is durable: what it includes may be acknowledged."""

    def state_dict(self) -> dict[str, Any]:
        """The feed's part of a checkpoint, ``config`` (the settings a resume must match) included."""

    def check(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint this feed cannot continue (before anything is loaded)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the feed's part of a checkpoint."""

    def fell_back(self, state: dict[str, Any], path: Path, skipped: list[Path]) -> None:
        """The checkpoint loaded from ``path`` is older than the unreadable ``skipped`` ones: recover what was
        done after it (a data set replays its batches; a stream reads the events acknowledged since again)."""

    def resumed_at(self) -> str:
        """Where a resume continues, in words."""

    def config(self) -> dict[str, Any]:
        """The run's resolved configuration (saved with checkpoints and models)."""


def check_resume(resume: Any, checkpoint_dir: Any) -> None:
    """``resume`` is ``False``, ``True`` or ``"force"`` (not a truthy number), and needs a checkpoint folder."""
    if not (isinstance(resume, bool) or isinstance(resume, str) and resume == "force"):
        raise expected("resume", "False, True or 'force'", resume)
    if resume and checkpoint_dir is None:
        raise expected("checkpoint_dir", "a folder when resume=True", None)


@contextlib.contextmanager
def session(dist: DistContext, checkpoint_dir: Any, all_ranks_raise: Callable[[BaseException], bool]) -> Iterator[None]:
    """One fit: one live run per checkpoint folder, and a failing rank leaves the group at once.

    An error that every rank raises at the same point (``all_ranks_raise``) passes as it is; any
    other error of a distributed run makes this rank leave the process group, so that the others
    stop at once instead of waiting for the timeout, and an error caused by another rank becomes
    a :class:`~batchfit.DistributedError` naming it.
    """
    lock = FolderLock(checkpoint_dir) if checkpoint_dir is not None and dist.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        yield
    except BaseException as error:
        if not dist.enabled or all_ranks_raise(error):
            raise
        replacement = dist.abort(error)
        if replacement is None:
            raise
        # The failed collective's own traceback (C++ frames) says nothing more than the first line
        # the replacement quotes.
        raise replacement from None
    finally:
        if lock is not None:
            lock.release()
