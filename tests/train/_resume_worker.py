"""Training runs for the kill tests, forked from one warm process.

Starting Python with torch takes seconds; forking a process that has already imported torch
and batchfit takes milliseconds, so the tests can kill many runs at random moments. The
test starts this file with ``sys.executable`` and talks to it one JSON object per line:

    {"op": "start", "folder": ..., "out": ..., "checkpoint_every": 1,
     "slow_writes": 0.0, "steps_file": None, "sigterm_at": None}  ->  {"pid": ...}
    {"op": "wait", "pid": ..., "timeout": 60}                        ->  {"status": exit code or -signal}
    {"op": "quit"}

Each run trains a small MLP (dropout, Adam, shuffled batches, frequent checkpoints) with
``resume=True`` and writes its final weights to ``out``; with ``steps_file`` it appends the
number of every completed step there. The test sends signals to the run's pid; with
``sigterm_at`` the run sends itself SIGTERM during that step (at its ``on_step_end``), so that a
test can place the signal at a given step deterministically.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

from batchfit import Callback, Trainer

EPOCHS = 3


class StepLog(Callback):
    """Appends each completed step's number to a file; SIGTERMs its own process during step ``sigterm_at``."""

    def __init__(self, path: str | None, sigterm_at: int | None = None) -> None:
        self.path, self.sigterm_at = path, sigterm_at

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(f"{record['step']}\n")
        if record["step"] == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


def train(folder: str, out: str, checkpoint_every: int = 1, slow_writes: float = 0.0,
          steps_file: str | None = None, sigterm_at: int | None = None) -> None:
    """One run, resumed from ``folder`` when it holds a checkpoint; final weights go to ``out``."""
    torch.set_num_threads(1)
    # Outside fit a SIGTERM is not the trainer's to handle: ignore it there, so that a signal that
    # arrives just after the last step lets the run end normally instead of killing it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if slow_writes:
        # Widen the window between writing a checkpoint's temporary file and renaming it.
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(slow_writes)
            real_fsync(fd)

        os.fsync = slow_fsync
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5).astype(np.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
    callbacks = [StepLog(steps_file, sigterm_at)] if steps_file or sigterm_at else []
    trainer = Trainer(model, F.cross_entropy, torch.optim.Adam(model.parameters(), lr=0.01), batch_size=16,
                      shuffle=True, seed=1, checkpoint_dir=folder, checkpoint_every=checkpoint_every,
                      keep_checkpoints=2, progress=False, callbacks=callbacks)
    trainer.fit((x, y), epochs=EPOCHS, resume=True)
    torch.save({"weights": model.state_dict(), "step": trainer.step}, out + ".tmp")
    os.replace(out + ".tmp", out)


def run_child(job: dict) -> None:
    code = 0
    try:
        train(job["folder"], job["out"], job["checkpoint_every"], job["slow_writes"], job["steps_file"],
              job.get("sigterm_at"))
    except SystemExit as stop:  # the trainer's answer to SIGTERM: 128 + 15
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)  # never return into the server's loop, never flush its stdout


def wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -999  # hung
        time.sleep(0.002)


def serve() -> None:
    # Warm up what the first optimizer imports (seconds), so that every forked run starts at once.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    reply({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        if job["op"] == "start":
            pid = os.fork()
            if pid == 0:
                run_child(job)
            reply({"pid": pid})
        elif job["op"] == "wait":
            reply({"status": wait(job["pid"], job.get("timeout", 60.0))})
        elif job["op"] == "quit":
            return


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve()
