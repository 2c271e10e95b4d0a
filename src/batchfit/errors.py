"""Errors raised by batchfit.

Every error is a ``ValueError`` so that code written against plain argument checks keeps
working::

    ValueError
    └── BatchfitError            any refused input or broken promise of batchfit
        ├── ShardError           a shard folder that is missing, corrupt or of unknown format
        ├── CheckpointError      a checkpoint that cannot be read or does not fit the run
        ├── NonFiniteLossError   a NaN or infinite loss (names the step and epoch)
        ├── DistributedError     another rank failed or stopped answering
        ├── StreamError          a stream's broker cannot be used (unreachable, refused, stream or group gone)
        └── ConfigError          a run configuration (TOML) that cannot be used (names the key)
"""

from __future__ import annotations

import re
from typing import Any


class BatchfitError(ValueError):
    """Base class of batchfit's errors."""


class ShardError(BatchfitError):
    """A shard folder or file is missing, truncated, corrupt or of an unknown format."""


class CheckpointError(BatchfitError):
    """A checkpoint cannot be read, or was written by a run that does not match."""


class NonFiniteLossError(BatchfitError):
    """The loss of a step was NaN or infinite."""

    def __init__(self, message: str, *, step: int, epoch: int) -> None:
        super().__init__(message)
        self.step = step
        self.epoch = epoch


class DistributedError(BatchfitError):
    """A rank of a distributed run failed, so every rank stops."""


class StreamError(BatchfitError):
    """A stream's broker cannot be used: unreachable for longer than the retries last, credentials refused,
    the stream or consumer group gone; the message names the URL (password masked), stream and group."""


class ConfigError(BatchfitError):
    """A configuration file that cannot be used; the message names the key."""


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it (``scheme://user:password@host``, ``?password=...``)
    replaced by ``***``: what batchfit writes to files and logs never holds one."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group(1)}***", text)


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s\"']*:)[^\s\"']+@")  # to the token's last @
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s\"']+")


def expected(name: str, what: str, received: Any) -> BatchfitError:
    """The standard refusal: names the argument, what was expected and what was received."""
    return BatchfitError(f"`{name}` must be {what}. Received: {name}={received!r}")


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is a (non-bool) positive integer, else raise naming ``name``."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a non-negative integer" if allow_zero else "a positive integer"
        raise expected(name, what, value)
    return value


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise naming ``name``."""
    # Compare types too: 1 == True and 0 == False, but shuffle=1 is not shuffle=True.
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        options = ", ".join(repr(c) for c in choices)
        raise expected(name, f"one of {options}", value)
    return value


def check_seed(value: Any, *, negative: bool = False) -> int:
    """Return ``value`` if it is a (non-bool) integer — non-negative unless ``negative`` — else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not negative):
        raise expected("seed", "an integer" if negative else "a non-negative integer", value)
    return value
