"""One rank of a distributed stream run, started by test_stream_ranks.py with the environment torchrun gives.

    python _stream_ranks_worker.py URL OUT [OPTIONS_JSON]

OPTIONS_JSON: ``claim_idle`` (seconds), ``checkpoint_dir`` (with a checkpoint every 3 steps and resume=True),
``stop_at`` (rank 1 asks to stop after that step), ``kill_at`` (rank 1 kills itself with SIGKILL after that
step), ``fail_at`` (rank 1's model raises RuntimeError in training mode at that step, never in eval mode: no
event fails on its own), ``sparse`` (a matrix factorisation with sparse embedding
gradients and SparseAdam on events ``user, item, rating`` instead).

Reads the Redis stream ``events`` as consumer ``rank-<RANK>`` of group ``g`` and trains the small net of
test_redis_streams.py on it; saves (torch.save) the ids this rank put into each step, the history and the
final weights to OUT.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.nn.functional as F
from _stream_worker import (  # the same model and events as the one-process worker (its folder is on sys.path)
    FIELDS,
    Net,
)

import batchfit as bf


def make_sparse_trainer(callbacks=(), **options) -> bf.Trainer:
    from batchfit.workloads.stream import MatrixFactorization, rmse_loss

    model = MatrixFactorization(20, 30, dim=4, sparse=True)
    return bf.Trainer(model, rmse_loss, torch.optim.SparseAdam(list(model.parameters()), lr=0.05), batch_size=16,
                      progress=False, callbacks=list(callbacks), **options)


def make_trainer(callbacks=(), **options) -> bf.Trainer:
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.8)  # stepped per step
    return bf.Trainer(net, F.mse_loss, optimizer, lr_schedule=schedule, batch_size=16, progress=False,
                      callbacks=list(callbacks), metrics={"mae": lambda out, y: (out - y).abs().mean()}, **options)


def main() -> None:
    url, out = sys.argv[1:3]
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    log = os.open(out + ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # survives a kill, unlike OUT
    fields = ("user", "item", "rating") if options.get("sparse") else FIELDS
    source = bf.StreamSource(bf.RedisStream(url, "events", group="g", consumer=f"rank-{rank}", fields=fields,
                                            idle_timeout=1.0, claim_idle=options.get("claim_idle", 30.0)))
    steps: list[list[str]] = []
    stop_at = options.get("stop_at")

    class Record(bf.Callback):
        def on_fit_begin(self, trainer):
            os.write(log, f"resume {trainer.step}\n".encode())

        def on_step_end(self, trainer, record):
            steps.append([] if source.last_batch is None else list(source.last_batch.ids))
            os.write(log, f"step {record['step']} {' '.join(steps[-1])}\n".encode())
            if record["step"] == stop_at and rank == 1:
                trainer.stop_training = True
            if record["step"] == options.get("kill_at") and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    folder = options.get("checkpoint_dir")
    checkpoints = {"checkpoint_dir": folder, "checkpoint_every": 3} if folder else {}
    trainer = (make_sparse_trainer if options.get("sparse") else make_trainer)([Record()], **checkpoints)
    if options.get("fail_at") is not None and rank == 1:
        def broken(module, inputs):
            if module.training and trainer.step + 1 == options["fail_at"]:
                raise RuntimeError("a kernel failed")

        trainer.module.register_forward_pre_hook(broken)
    history = trainer.fit(source, resume=bool(folder))
    torch.save({"steps": steps, "history": history.steps, "epochs": history.epochs,
                "weights": {k: v.clone() for k, v in trainer.module.state_dict().items()},
                "redelivered": source.consumer.redelivered}, out)


if __name__ == "__main__":
    main()
