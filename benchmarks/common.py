"""What the benchmarks share: the table helpers of ``batchfit bench``, fresh child processes, the repository root."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchfit.bench import Row, format_table, interleaved, ratio_row

__all__ = ["ROOT", "Row", "child_command", "format_table", "interleaved", "ratio_row", "run_child_task"]

ROOT = Path(__file__).resolve().parents[1]


def child_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``python -m benchmarks.<module> ARGS`` in a fresh process.

    The repository root goes first on the child's ``PYTHONPATH`` (``benchmarks`` is not installed); the
    rest of the environment, a ``PYTHONPATH`` that finds ``batchfit`` included, is passed on.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return [sys.executable, "-m", f"benchmarks.{module}", *args], env


def run_child_task(spec: str, tasks: dict[str, Callable[..., Any]]) -> None:
    """Run the task a benchmark's ``--child`` argument names (JSON ``[name, *args]``) in this fresh
    process and print its result as JSON for the parent to read."""
    name, *args = json.loads(spec)
    print(json.dumps(tasks[name](*args)))
