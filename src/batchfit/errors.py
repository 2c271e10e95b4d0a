"""Errors raised by batchfit.

A refused input is a ``ValueError``, so that code written against plain argument checks keeps
working; a run that fails while training is a ``RuntimeError``; every one is a
:class:`BatchfitError`::

    BatchfitError                  every error batchfit raises
    ├── InputError (ValueError)    a refused input: argument, data, file, model or loss that do not fit
    │   ├── ShardError             a shard folder that is missing, corrupt or of unknown format
    │   ├── CheckpointError        a checkpoint that cannot be read or does not fit the run
    │   └── ConfigError            a run configuration (TOML) that cannot be used (names the key)
    ├── NonFiniteLossError (RuntimeError)  a NaN or infinite loss (names the step and epoch)
    ├── DistributedError (RuntimeError)    another rank failed or stopped answering
    └── StreamError (RuntimeError)         a stream's broker cannot be used (unreachable, refused,
                                           stream or group gone)

In 0.1 every one was a ``ValueError``; ``except ValueError`` no longer catches a
non-finite loss, another rank's failure or a broker fault (``except bf.BatchfitError`` does).
"""

from __future__ import annotations

import re
from typing import Any


class BatchfitError(Exception):
    """Base class of batchfit's errors."""


class InputError(BatchfitError, ValueError):
    """A refused input: an argument, data, a file, a model or a loss that cannot be used as given; the message
    names it, what was expected and what was received."""


class ShardError(InputError):
    """A shard folder or file is missing, truncated, corrupt or of an unknown format."""


class CheckpointError(InputError):
    """A checkpoint cannot be read, or was written by a run that does not match."""


class NonFiniteLossError(BatchfitError, RuntimeError):
    """The loss of a step was NaN or infinite."""

    def __init__(self, message: str, *, step: int, epoch: int) -> None:
        super().__init__(message)
        self.step = step
        self.epoch = epoch


class DistributedError(BatchfitError, RuntimeError):
    """A rank of a distributed run failed, so every rank stops."""


class StreamError(BatchfitError, RuntimeError):
    """A stream's broker cannot be used: unreachable for longer than the retries last, credentials refused,
    the stream or consumer group gone; the message names the URL (password masked), stream and group."""


class ConfigError(InputError):
    """A configuration file that cannot be used; the message names the key."""


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it (``scheme://user:password@host``, ``?password=...``)
    replaced by ``***``: what batchfit writes to files and logs never holds one."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group(1)}***", text)


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s\"']*:)[^\s\"']+@")  # to the token's last @
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s\"']+")


def expected(name: str, what: str, received: Any) -> InputError:
    """The standard refusal: names the argument, what was expected and what was received."""
    return InputError(f"`{name}` must be {what}. Received: {name}={received!r}")


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
