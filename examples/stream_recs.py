"""Recommendations updated in near real time, end to end in one script.

    python examples/stream_recs.py                    # starts a redis-server of its own (needs the binary)
    python examples/stream_recs.py --redis redis://127.0.0.1:6379/0
    python examples/stream_recs.py produce --redis redis://127.0.0.1:6379/0 --rate 5000   # producer only

A producer thread replays MovieLens-100k (from the recbole package) into a Redis stream in time order
at --rate events/s; the trainer reads it in a consumer group, cuts batches of 1,024 events or whatever came
within 50 ms, scores each batch before training on it (prequential RMSE), acknowledges events once a
checkpoint holds their update, and publishes snapshots that a serving process loads with
bf.streams.load_snapshot. Needs: pip install "batchfit[stream]" pandas; pip install --no-deps recbole.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import torch

import batchfit as bf
from batchfit.workloads.stream import ML100K_FIELDS, Recipe, load_movielens_100k, replay


@contextlib.contextmanager
def own_redis_server(folder: Path) -> Iterator[str]:
    """A redis-server of our own on a unix socket in ``folder`` (no TCP port, nothing kept on disk); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server); "
                         "or pass --redis URL of a running one")
    socket_path = folder / "redis.sock"
    server = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(socket_path), "--save", "",
                               "--appendonly", "no", "--dir", str(folder), "--logfile", str(folder / "redis.log")])
    try:
        client = redis.Redis(unix_socket_path=str(socket_path))
        for _ in range(250):  # up to 5 s for it to listen
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.02)
        client.close()
        yield f"unix://{socket_path}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def produce(url: str, rate: float, limit: int | None) -> None:
    """XADD the ratings to the stream "ratings" in time order, at about ``rate`` events/s."""
    client = redis.Redis.from_url(url)
    ids = replay(client, "ratings", load_movielens_100k(), rate=rate, chunk=50, limit=limit)
    print(f"produced {len(ids)} events")


def train(url: str, folder: Path, rate: float, limit: int | None) -> None:
    recipe = Recipe()  # plain SGD at river's per-event steps, batch 1024, sequential scoring (docs/streams.md)
    model = recipe.model()
    snapshots = bf.streams.PublishSnapshots(folder / "snapshots", every_seconds=2.0)
    trainer = bf.Trainer(model, recipe.loss(model), recipe.optimizer(model), batch_size=recipe.batch_size,
                         checkpoint_dir=folder / "checkpoints", checkpoint_every=25, callbacks=[snapshots])
    events = bf.streams.RedisStream(url, "ratings", group="recs", consumer="trainer-0", fields=ML100K_FIELDS,
                            idle_timeout=3.0)
    producer = threading.Thread(target=produce, args=(url, rate, limit), daemon=True)
    producer.start()
    history = trainer.fit(bf.streams.StreamSource(events, max_latency=0.05), resume=True)
    rmse = [math.sqrt(v) for v in history.column("preq_loss")]
    window = [math.sqrt(v) for v in history.column("preq_loss_window")]
    for step in range(0, len(rmse), max(1, len(rmse) // 10)):
        print(f"step {step + 1:6d}: prequential RMSE {rmse[step]:.3f} (last 1000 events {window[step]:.3f})")
    print(f"{trainer.samples_seen} events, prequential RMSE {rmse[-1]:.3f}; newest snapshot: "
          f"{bf.streams.load_snapshot(folder / 'snapshots')[1]}")
    history.plot(folder / "curves.png")
    print(f"curves: {folder / 'curves.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("train", "produce"), default="train")
    parser.add_argument("--redis", help="a redis:// URL (default: start a redis-server of our own)")
    parser.add_argument("--rate", type=float, default=5000.0, help="events per second replayed")
    parser.add_argument("--limit", type=int, help="replay only the first N ratings")
    parser.add_argument("--out", default=None, help="folder for checkpoints, snapshots and curves")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        url = args.redis or stack.enter_context(own_redis_server(scratch))
        if args.command == "produce":
            produce(url, args.rate, args.limit)
            return
        folder = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        train(url, folder, args.rate, args.limit)


if __name__ == "__main__":
    main()
