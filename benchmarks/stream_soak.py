"""The stream workload soaked: a million synthetic ratings through a redis-server of its own, the trainer killed
with SIGKILL every 20-40 s and restarted with ``resume=True`` each time; then the lag at three producer rates.

Soak. A producer thread ``XADD``s the events at a fixed rate (``--rate``; 0: as fast as Redis takes them), users
and items drawn from an id space that keeps growing (1,000 users + one every 10 events, 500 items + one every
50), so the model is a :class:`~batchfit.workloads.stream.MatrixFactorization` with hashed tables (ids from an
open set, sparse gradients, plain SGD). The trainer is a subprocess (``python -m benchmarks.stream_soak
--worker``): batch 32, ``max_latency`` 50 ms, ``max_batch_size`` 512 to catch up after a restart, a checkpoint
every ``--checkpoint-seconds``. It logs each step (its number, the time at its end, the ids of its events), each
resume (the step it resumed from) and, every second, its RSS and the size of the newest checkpoint. At the end:

- lineage: the steps the final weights descend from (a resume drops the logged steps after the checkpoint it
  loaded) hold every produced event exactly once; none lost, none twice; nothing left pending in the group;
- memory: RSS and checkpoint size per 100,000 events trained, and "flat": the median of the last quarter of the
  events within ``--flat-tolerance`` of that of the second quarter (printed, not asserted);
- lag: for each of 5,000, 10,000 and 20,000 events/s, a fresh stream and trainer (no kills) fed ``--segment-events``
  events; each event's lag is from its ``XADD`` (the time in its stream id) to the end of the step that trained it.

Run with ``python benchmarks/run.py --only stream_soak [--quick]`` (the full run takes several minutes).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import child_command

FIELDS = ("user", "item", "rating")
GROUP = "soak"


@dataclass
class Settings:
    """The trainer's settings (the same in every incarnation and rate segment)."""

    batch_size: int = 32
    max_batch_size: int = 512
    max_latency: float = 0.05
    checkpoint_seconds: float = 5.0
    idle_timeout: float = 5.0
    users: int = 1 << 17  # hashed buckets
    items: int = 1 << 15
    dim: int = 8
    lr: float = 0.05
    memory_every: float = 1.0  # seconds between RSS samples


# ------------------------------------------------------------------------------------------------ the events


def synthetic_columns(first: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Events ``first`` to ``first + count - 1`` of the synthetic stream: users and items from an id space that
    grows with the event's index, ratings in [1, 5] from hidden per-id tastes plus noise."""
    index = np.arange(first, first + count, dtype=np.int64)
    rng = np.random.default_rng([seed, first])
    user = rng.integers(0, 1000 + index // 10)
    item = rng.integers(0, 500 + index // 50)
    taste = 0.8 * np.sin(0.7 * user) + 0.6 * np.cos(1.3 * item) + 0.5 * np.sin(0.3 * user + 0.2 * item)
    rating = np.clip(np.round(3.5 + taste + rng.normal(0.0, 0.5, count), 1), 1.0, 5.0).astype(np.float32)
    return {"user": user, "item": item, "rating": rating}


def produce(url: str, stream: str, events: int, rate: float | None, ids: list[str], seed: int = 0,
            block: int = 20_000) -> None:
    """``XADD`` ``events`` synthetic events to ``stream`` at about ``rate`` events/s (``None``: as fast as Redis
    takes them), appending their stream ids to ``ids`` as it goes."""
    import redis

    from batchfit.workloads.stream import replay

    client = redis.Redis.from_url(url)
    chunk = 500 if rate is None else max(10, int(rate // 500))  # about 500 pipelines a second at most
    start = time.perf_counter()
    try:
        for first in range(0, events, block):
            columns = synthetic_columns(first, min(block, events - first), seed)
            if rate is None:
                ids += replay(client, stream, columns, FIELDS, chunk=chunk)
            else:
                ids += _paced(client, stream, columns, rate, chunk, start, first)
    finally:
        client.close()


def _paced(client: Any, stream: str, columns: dict[str, np.ndarray], rate: float, chunk: int, start: float,
           done: int) -> list[str]:
    """One block of ``replay`` at ``rate``, paced from the producer's ``start`` (not the block's)."""
    from batchfit.workloads.stream import replay

    ids: list[str] = []
    count = len(columns["user"])
    for first in range(0, count, chunk):
        part = {k: v[first : first + chunk] for k, v in columns.items()}
        ids += replay(client, stream, part, FIELDS, rate=None, chunk=chunk)
        ahead = start + (done + len(ids)) / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    return ids


# ------------------------------------------------------------------------------------------------ the trainer


def _rss_bytes() -> int:
    """This process's resident set size, from ``/proc/self/status``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(url: str, stream: str, folder: str, log_path: str, options: dict[str, Any]) -> None:
    """One incarnation of the trainer: resume from ``folder``, train until the stream is idle, logging to
    ``log_path`` (``resume <step> <samples>``, ``step <n> <time> <ids...>``, ``mem <samples> <rss> <checkpoint
    bytes> <time>``, ``done``)."""
    import torch

    import batchfit as bf
    from batchfit.train.checkpoint import list_checkpoints
    from batchfit.workloads.stream import MatrixFactorization, rmse_loss

    settings = Settings(**options)
    torch.set_num_threads(1)
    consumer = bf.streams.RedisStream(url, stream, group=GROUP, consumer="trainer", fields=FIELDS,
                              idle_timeout=settings.idle_timeout)
    source = bf.streams.StreamSource(consumer, max_latency=settings.max_latency, max_batch_size=settings.max_batch_size)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    class SoakLog(bf.Callback):
        next_sample = 0.0

        def on_fit_begin(self, trainer: bf.Trainer) -> None:
            os.write(log, f"resume {trainer.step} {trainer.samples_seen}\n".encode())

        def on_step_end(self, trainer: bf.Trainer, record: dict[str, Any]) -> None:
            assert source.last_batch is not None
            now = time.time()
            os.write(log, f"step {record['step']} {now:.4f} {' '.join(source.last_batch.ids)}\n".encode())
            if now >= self.next_sample:
                self.next_sample = now + settings.memory_every
                newest = list_checkpoints(folder)
                try:
                    size = newest[0].stat().st_size if newest else 0
                except FileNotFoundError:  # pruned between the listing and the stat
                    size = 0
                os.write(log, f"mem {trainer.samples_seen} {_rss_bytes()} {size} {now:.3f}\n".encode())

    model = MatrixFactorization(settings.users, settings.items, dim=settings.dim, hashed=True, sparse=True)
    trainer = bf.Trainer(model, rmse_loss, torch.optim.SGD(model.parameters(), lr=settings.lr),
                         batch_size=settings.batch_size, checkpoint_dir=folder,
                         checkpoint_seconds=settings.checkpoint_seconds, callbacks=[SoakLog()], progress=False)
    trainer.fit(source, resume=True)
    os.write(log, b"done\n")


def _start_worker(url: str, stream: str, folder: Path, log: Path, settings: Settings) -> subprocess.Popen[bytes]:
    import batchfit

    command, env = child_command("stream_soak", "--worker",
                                 json.dumps([url, stream, str(folder), str(log), asdict(settings)]))
    # The child trains with the library this process imported (a checkout's src/, not an installed copy).
    env["PYTHONPATH"] = os.pathsep.join([str(Path(batchfit.__file__).resolve().parents[1]), env["PYTHONPATH"]])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)


def _wait_for(log: Path, offset: int, word: bytes, worker: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until the log, past ``offset``, holds a line starting with ``word`` (or the worker exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        if log.exists():
            with open(log, "rb") as handle:
                handle.seek(offset)
                if any(line.startswith(word) for line in handle):
                    return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------------ reading the log


@dataclass
class Log:
    """What a trainer's log says: the steps of the final lineage, every step logged, memory samples."""

    lineage: dict[int, tuple[float, list[str]]]  # step -> (time at its end, its event ids)
    logged_steps: int
    logged_events: int
    resumes: list[tuple[int, int]]  # (step, samples) each incarnation started from
    memory: list[tuple[int, int, int, float, int]]  # (samples, rss, checkpoint bytes, time, incarnation)
    done: bool


def read_log(path: Path) -> Log:
    """Rebuild the lineage from a log: each ``resume <step>`` drops the logged steps after ``step``."""
    lineage: dict[int, tuple[float, list[str]]] = {}
    logged_steps = logged_events = 0
    resumes: list[tuple[int, int]] = []
    memory: list[tuple[int, int, int, float, int]] = []
    done = False
    with open(path) as handle:
        for line in handle:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "step":
                step, when, *ids = rest.split(" ")
                lineage[int(step)] = (float(when), ids)
                logged_steps += 1
                logged_events += len(ids)
            elif kind == "resume":
                step, samples = (int(v) for v in rest.split())
                resumes.append((step, samples))
                lineage = {s: v for s, v in lineage.items() if s <= step}
                done = False
            elif kind == "mem":
                samples, rss, size, when = rest.split()
                memory.append((int(samples), int(rss), int(size), float(when), len(resumes)))
            elif kind == "done":
                done = True
    return Log(lineage, logged_steps, logged_events, resumes, memory, done)


def check_lineage(log: Log, produced: list[str]) -> dict[str, Any]:
    """Every produced event in the final lineage exactly once: counts of the lost, the doubled, the unknown."""
    counts = Counter(i for _, ids in log.lineage.values() for i in ids)
    wanted = set(produced)
    lost = len(wanted - counts.keys())
    twice = sum(1 for c in counts.values() if c > 1)
    unknown = len(counts.keys() - wanted)
    steps = sorted(log.lineage)
    contiguous = steps == list(range(1, len(steps) + 1))
    trained = sum(counts.values())
    return {"produced": len(produced), "distinct_produced": len(wanted), "in_lineage": trained, "lost": lost,
            "twice": twice, "unknown": unknown, "steps_contiguous": contiguous, "lineage_steps": len(steps),
            "logged_steps": log.logged_steps, "retrained_events": log.logged_events - trained,
            "exact": lost == 0 and twice == 0 and unknown == 0 and contiguous and trained == len(produced)}


# ------------------------------------------------------------------------------------------------ the soak


def soak(url: str, folder: Path, events: int, rate: float | None, kill_every: tuple[float, float] = (20.0, 40.0),
         max_kills: int | None = None, settings: Settings | None = None, seed: int = 0,
         timeout: float = 3600.0) -> dict[str, Any]:
    """Produce ``events`` at ``rate`` while the trainer is killed (SIGKILL) every ``kill_every`` seconds (uniform,
    counted from its first step), at most ``max_kills`` times, while the producer runs; then one last incarnation
    drains the stream. Returns the lineage check, the kills and the memory samples."""
    import redis

    settings = settings or Settings()
    stream, checkpoints, log = "soak", folder / "checkpoints", folder / "soak.log"
    produced: list[str] = []
    producer = threading.Thread(target=produce, args=(url, stream, events, rate, produced, seed), daemon=True)
    rng = random.Random(seed)
    kills, incarnations, started = 0, 0, time.perf_counter()
    deadline = time.monotonic() + timeout
    producer.start()
    while producer.is_alive() and (max_kills is None or kills < max_kills) and time.monotonic() < deadline:
        offset = log.stat().st_size if log.exists() else 0
        trainer = _start_worker(url, stream, checkpoints, log, settings)
        incarnations += 1
        try:
            if _wait_for(log, offset, b"step", trainer, timeout=120.0):
                wait_until = time.monotonic() + rng.uniform(*kill_every)
                while time.monotonic() < wait_until and trainer.poll() is None:
                    time.sleep(0.1)
            if trainer.poll() is None:
                trainer.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            if trainer.poll() is None:
                trainer.kill()
            trainer.wait()
        print(f"stream_soak: {kills} kills, {len(produced):,} of {events:,} produced, "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    last = _start_worker(url, stream, checkpoints, log, settings)  # with no kill left, while the producer runs
    incarnations += 1
    try:
        producer.join()
        produced_seconds = time.perf_counter() - started
        code = last.wait(timeout=max(60.0, deadline - time.monotonic()))
    finally:
        if last.poll() is None:
            last.kill()
            last.wait()
    seconds = time.perf_counter() - started
    result = read_log(log)
    client = redis.Redis.from_url(url)
    pending = int(client.xpending(stream, GROUP)["pending"])
    client.close()
    lineage = check_lineage(result, produced)
    lineage["pending"] = pending
    lineage["exact"] = bool(lineage["exact"] and pending == 0 and code == 0 and result.done)
    return {"events": events, "rate": rate, "kills": kills, "incarnations": incarnations, "last_exit": code,
            "kill_every": list(kill_every), "produce_seconds": produced_seconds, "seconds": seconds,
            "settings": asdict(settings), "lineage": lineage, "memory": result.memory,
            "checkpoints_left": len(list(checkpoints.glob("step-*.pt")))}


def memory_table(memory: list[tuple[int, int, int, float, int]], events: int,
                 per: int = 100_000) -> list[dict[str, Any]]:
    """Per ``per`` events trained (the trainer's position when sampled): the median and largest RSS and the
    median size of the newest checkpoint, and the incarnations sampled."""
    rows = []
    for first in range(0, events, per):
        chosen = [m for m in memory if first < m[0] <= first + per]
        if not chosen:
            continue
        sizes = [m[2] for m in chosen if m[2]]
        rows.append({"from": first, "to": min(first + per, events), "samples": len(chosen),
                     "rss_median": float(np.median([m[1] for m in chosen])), "rss_max": max(m[1] for m in chosen),
                     "checkpoint_median": float(np.median(sizes)) if sizes else 0.0,
                     "incarnations": sorted({m[4] for m in chosen})})
    return rows


def flatness(memory: list[tuple[int, int, int, float, int]], events: int, tolerance: float) -> dict[str, Any]:
    """The last quarter's median (RSS, checkpoint size) against the second quarter's, and whether each held
    within ``tolerance`` (a fraction)."""
    def quarter(q: int, column: int) -> float:
        values = [m[column] for m in memory if q * events / 4 < m[0] <= (q + 1) * events / 4 and m[column]]
        return float(np.median(values)) if values else float("nan")

    out: dict[str, Any] = {"tolerance": tolerance}
    for name, column in (("rss", 1), ("checkpoint", 2)):
        second, last = quarter(1, column), quarter(3, column)
        ratio = last / second if second else float("nan")
        out[name] = {"second_quarter": second, "last_quarter": last, "ratio": ratio,
                     "flat": bool(abs(ratio - 1) <= tolerance)}
    return out


def incarnation_table(memory: list[tuple[int, int, int, float, int]]) -> list[dict[str, Any]]:
    """Per incarnation: events it trained (from its first RSS sample to its last), and its RSS then."""
    rows = []
    for number in sorted({m[4] for m in memory}):
        chosen = [m for m in memory if m[4] == number]
        rows.append({"incarnation": number, "samples_from": chosen[0][0], "samples_to": chosen[-1][0],
                     "seconds": chosen[-1][3] - chosen[0][3], "rss_first": chosen[0][1], "rss_last": chosen[-1][1],
                     "rss_max": max(m[1] for m in chosen)})
    return rows


# ------------------------------------------------------------------------------------------------ the lag


def lag_segment(url: str, folder: Path, rate: float, events: int, settings: Settings | None = None,
                seed: int = 1) -> dict[str, Any]:
    """A fresh stream and trainer (no kills), the producer started once the trainer is up: each event's lag from
    its ``XADD`` to the end of the step that trained it, p50/p99, and the lineage check."""
    from batchfit.data.redis_streams import id_time

    settings = settings or Settings()
    stream, log = f"rate-{int(rate)}", folder / f"rate-{int(rate)}.log"
    trainer = _start_worker(url, stream, folder / f"checkpoints-{int(rate)}", log, settings)
    produced: list[str] = []
    try:
        if not _wait_for(log, 0, b"resume", trainer, timeout=120.0):
            raise RuntimeError(f"the trainer of the {rate:g} events/s segment did not start (exit {trainer.poll()})")
        produce(url, stream, events, rate, produced, seed)
        code = trainer.wait(timeout=600)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    result = read_log(log)
    lags = np.array([when - id_time(i) for when, ids in result.lineage.values() for i in ids])
    sizes = [len(ids) for _, ids in result.lineage.values()]
    times = [when for when, _ in result.lineage.values()]
    added = sorted(id_time(i) for i in produced)
    lineage = check_lineage(result, produced)
    return {"rate": rate, "events": events, "true_rate": (len(added) - 1) / max(added[-1] - added[0], 1e-3),
            "trained_per_s": sum(sizes) / max(max(times) - min(times), 1e-3), "steps": len(sizes),
            "largest_batch": max(sizes), "p50_ms": 1000 * float(np.percentile(lags, 50)),
            "p99_ms": 1000 * float(np.percentile(lags, 99)), "max_ms": 1000 * float(lags.max()),
            "exact": bool(lineage["exact"] and code == 0)}


# ------------------------------------------------------------------------------------------------ reporting


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def format_report(results: dict[str, Any]) -> str:
    """The soak's figures as Markdown: the run, lineage, memory per 100k events, flatness, per incarnation, lag."""
    run, lineage = results["soak"], results["soak"]["lineage"]
    if not run["events"]:  # --events 0: the lag segments alone
        return "\n".join(_lag_lines(results["lag"]))
    rate = "as fast as possible" if not run["rate"] else f"{run['rate']:,.0f} events/s"
    lines = [f"Soak: {run['events']:,} events produced at {rate} in {run['produce_seconds']:.0f} s; the trainer killed "
             f"(SIGKILL) {run['kills']} times, every {run['kill_every'][0]:g}-{run['kill_every'][1]:g} s at random, "
             f"{run['incarnations']} incarnations, {run['seconds']:.0f} s in all; checkpoint every "
             f"{run['settings']['checkpoint_seconds']:g} s.", "",
             f"Lineage: {'EXACT' if lineage['exact'] else 'NOT EXACT'}: {lineage['in_lineage']:,} events in the final "
             f"lineage of {lineage['produced']:,} produced; lost {lineage['lost']}, trained twice {lineage['twice']}, "
             f"unknown {lineage['unknown']}, pending {lineage['pending']}; {lineage['lineage_steps']:,} steps in the "
             f"lineage (contiguous: {lineage['steps_contiguous']}), {lineage['logged_steps']:,} logged; "
             f"{lineage['retrained_events']:,} events trained again after a kill (their first update was lost).", "",
             "| events trained | RSS samples | RSS median | RSS max | newest checkpoint (median) | incarnations |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in results["memory_table"]:
        lines.append(f"| {row['from']:,}-{row['to']:,} | {row['samples']} | {_mib(row['rss_median'])} | "
                     f"{_mib(row['rss_max'])} | {_mib(row['checkpoint_median'])} | "
                     f"{', '.join(str(i) for i in row['incarnations'])} |")
    flat = results["flatness"]
    lines.append("")
    for name in ("rss", "checkpoint"):
        f = flat[name]
        if f["ratio"] != f["ratio"]:  # NaN: a quarter without a sample (a short run)
            lines.append(f"{name}: too few samples to compare the quarters")
            continue
        lines.append(f"{name}: last quarter's median {_mib(f['last_quarter'])} against the second quarter's "
                     f"{_mib(f['second_quarter'])}: ratio {f['ratio']:.3f}, flat within "
                     f"{100 * flat['tolerance']:g} %: {'yes' if f['flat'] else 'NO'}")
    lines += ["", "| incarnation | events trained (position) | seconds | RSS first | RSS last | RSS max |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in results["incarnations"]:
        lines.append(f"| {row['incarnation']} | {row['samples_from']:,}-{row['samples_to']:,} | {row['seconds']:.0f} | "
                     f"{_mib(row['rss_first'])} | {_mib(row['rss_last'])} | {_mib(row['rss_max'])} |")
    return "\n".join([*lines, "", *_lag_lines(results["lag"])])


def _lag_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| producer rate asked | true rate | trained events/s | steps | largest batch | lag p50 | lag p99 "
             "| lag max | lineage |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['rate']:,.0f} ev/s | {row['true_rate']:,.0f} ev/s | {row['trained_per_s']:,.0f} | "
                     f"{row['steps']:,} | {row['largest_batch']} | {row['p50_ms']:,.0f} ms | {row['p99_ms']:,.0f} ms "
                     f"| {row['max_ms']:,.0f} ms | {'exact' if row['exact'] else 'NOT EXACT'} |")
    return lines


def plot_memory(results: dict[str, Any], path: str | Path) -> None:
    """RSS and the newest checkpoint's size against events trained, one colour per incarnation."""
    from batchfit.core.figures import new_figure, save_figure

    figure, axes = new_figure(1, 2, (11, 4))
    memory = results["soak"]["memory"]
    for number in sorted({m[4] for m in memory}):
        chosen = [m for m in memory if m[4] == number]
        axes[0][0].plot([m[0] for m in chosen], [m[1] / 2**20 for m in chosen], ".", ms=3)
        axes[0][1].plot([m[0] for m in chosen if m[2]], [m[2] / 2**20 for m in chosen if m[2]], ".", ms=3)
    axes[0][0].set(xlabel="events trained", ylabel="RSS (MiB)", title="trainer RSS (a colour per incarnation)")
    axes[0][1].set(xlabel="events trained", ylabel="MiB", title="newest checkpoint")
    save_figure(figure, path)


def run(events: int, rate: float | None, kill_every: tuple[float, float], max_kills: int | None,
        rates: list[float], segment_events: int, settings: Settings, tolerance: float = 0.1, seed: int = 0,
        folder: str | Path | None = None) -> dict[str, Any]:
    """The soak, then the lag segments, on one redis-server of its own; every figure as a dict."""
    from .stream import temporary_redis_server

    with tempfile.TemporaryDirectory(dir=folder) as tmp, temporary_redis_server(Path(tmp) / "redis") as url:
        result = soak(url, Path(tmp), events, rate, kill_every, max_kills, settings, seed)
        lags = []
        for r in rates:
            print(f"stream_soak: lag at {r:,.0f} events/s", file=sys.stderr, flush=True)
            lags.append(lag_segment(url, Path(tmp), r, segment_events, settings))
    memory = result["memory"]
    return {"soak": result, "memory_table": memory_table(memory, events, per=max(events // 10, 1)),
            "flatness": flatness(memory, events, tolerance), "incarnations": incarnation_table(memory), "lag": lags}


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/run.py --only stream_soak [--quick] [options]``; with ``--worker JSON``, one trainer."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 events, 2 kills every 5-10 s, 10,000 events "
                        "a rate segment")
    parser.add_argument("--events", type=int, help="events of the soak (default 1,000,000; --quick 100,000; 0: "
                        "only the lag segments)")
    parser.add_argument("--rate", type=float, default=5000.0, help="the soak producer's events/s (0: as fast as "
                        "possible; default 5,000)")
    parser.add_argument("--kill-every", default=None, help="seconds between kills, 'LOW,HIGH' (default 20,40; "
                        "--quick 5,10)")
    parser.add_argument("--kills", type=int, help="at most this many kills (default: while the producer runs; "
                        "--quick 2)")
    parser.add_argument("--checkpoint-seconds", type=float, default=5.0, help="the trainer's checkpoint interval")
    parser.add_argument("--rates", default="5000,10000,20000", help="producer rates of the lag segments")
    parser.add_argument("--segment-events", type=int, help="events a lag segment (default 60,000; --quick 10,000)")
    parser.add_argument("--flat-tolerance", type=float, default=0.1, help="'flat': the last quarter's median within "
                        "this fraction of the second quarter's (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every result to this JSON file")
    parser.add_argument("--plot", help="PNG of RSS and checkpoint size against events trained")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*json.loads(args.worker))
        return 0
    kill_every = tuple(float(v) for v in (args.kill_every or ("5,10" if args.quick else "20,40")).split(","))
    assert len(kill_every) == 2, "--kill-every LOW,HIGH"
    settings = Settings(checkpoint_seconds=args.checkpoint_seconds)
    events = args.events if args.events is not None else (100_000 if args.quick else 1_000_000)
    results = run(events=events, rate=args.rate or None,
                  kill_every=(kill_every[0], kill_every[1]), max_kills=args.kills if args.kills is not None else
                  (2 if args.quick else None), rates=[float(r) for r in args.rates.split(",") if r],
                  segment_events=args.segment_events or (10_000 if args.quick else 60_000), settings=settings,
                  tolerance=args.flat_tolerance, seed=args.seed)
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    if args.plot:
        plot_memory(results, args.plot)
    return 0 if results["soak"]["lineage"]["exact"] and all(r["exact"] for r in results["lag"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
