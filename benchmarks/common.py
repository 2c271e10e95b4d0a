"""What the benchmarks share: the table helpers of ``batchfit bench``, fresh child processes, the repository root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


def launch_ranks(command: list[str], env: dict[str, str], ranks: int, timeout: float,
                 what: str) -> list[dict[str, Any]]:
    """Run ``command`` as ``ranks`` fresh processes with the environment torchrun would give them (one
    torch thread each, a free port on 127.0.0.1; a single process gets no rank variables at all); the
    JSON object each printed on its last line, by rank. ``what`` names the run in errors."""
    env = {k: v for k, v in env.items() if k not in _TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    processes = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks))
                                  if ranks > 1 else env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(ranks)]
    deadline, outputs = time.monotonic() + timeout, []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise RuntimeError(f"the {ranks}-process {what} took over {timeout} s") from None
    for process, (_, stderr) in zip(processes, outputs):
        if process.returncode:
            raise RuntimeError(f"a process of the {what} failed (exit {process.returncode}):\n{stderr[-3000:]}")
    return [dict(json.loads(out.strip().splitlines()[-1])) for out, _ in outputs]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_child_task(spec: str, tasks: dict[str, Callable[..., Any]]) -> None:
    """Run the task a benchmark's ``--child`` argument names (JSON ``[name, *args]``) in this fresh
    process and print its result as JSON for the parent to read."""
    name, *args = json.loads(spec)
    print(json.dumps(tasks[name](*args)))
