"""A trainer reading a Redis stream, run as a subprocess by test_stream_kill.py (which kills it with SIGKILL).

Logs ``resume <step>`` when fit begins (after loading the checkpoint) and ``step <n> <ids...>`` after each
update, so that the test can rebuild which events the final weights learnt from.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import batchfit as bf

FIELDS = ("x0", "x1", "x2", "y")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x0, x1, x2):
        return self.linear(torch.stack([x0, x1, x2], dim=1)).squeeze(1)


def main() -> None:
    url, checkpoint_dir, log_path = sys.argv[1:4]
    torch.set_num_threads(1)
    source = bf.StreamSource(bf.RedisStream(url, "events", group="g", consumer="trainer", fields=FIELDS,
                                            idle_timeout=2.0), max_latency=0.05)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    class Log(bf.Callback):
        def on_fit_begin(self, trainer):
            os.write(log, f"resume {trainer.step}\n".encode())

        def on_step_end(self, trainer, record):
            assert source.last_batch is not None
            os.write(log, f"step {record['step']} {' '.join(source.last_batch.ids)}\n".encode())

    net = Net()
    trainer = bf.Trainer(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.01), batch_size=8,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=5, callbacks=[Log()], progress=False)
    trainer.fit(source, resume=True)
    os.write(log, b"done\n")


if __name__ == "__main__":
    main()
