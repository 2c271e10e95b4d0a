"""At-least-once for real: kill -9 the trainer at random moments while a producer writes events to Redis (one in
50 of them poison), restart it each time, and count what the final weights learnt from."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_stream_worker.py")
EVENTS = 3000
BATCH, CHECKPOINT_EVERY = 8, 5  # as in the worker


def _start(url: str, checkpoint_dir: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, str(WORKER), url, str(checkpoint_dir), str(log)], env=env)


def _steps_since_last_resume(log: Path) -> int:
    lines = log.read_text().splitlines() if log.exists() else []
    last = max((i for i, line in enumerate(lines) if line.startswith("resume")), default=None)
    return 0 if last is None else sum(line.startswith("step") for line in lines[last:])


def _lineage(log: Path) -> tuple[dict[int, list[str]], int]:
    """The steps the final weights descend from (each resume drops the steps after its checkpoint), and how
    many steps were logged in all."""
    lineage: dict[int, list[str]] = {}
    logged = 0
    for line in log.read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "resume":
            resumed = int(rest)
            lineage = {step: ids for step, ids in lineage.items() if step <= resumed}
        elif kind == "step":
            step, *ids = rest.split()
            lineage[int(step)] = ids
            logged += 1
    return lineage, logged


@pytest.mark.slow
def test_stream_kill9_loses_no_event_and_trains_none_twice(redis_server, tmp_path):
    import redis

    client = redis.Redis.from_url(redis_server)
    produced: list[str] = []
    poison: set[str] = set()

    def produce():
        rng = random.Random(1)
        for chunk in range(0, EVENTS, 50):  # about 250 events/s: the producer writes while the trainer is killed
            pipe = client.pipeline(transaction=False)
            for index in range(50):
                fields = {f: repr(rng.gauss(0, 1)) for f in ("x0", "x1", "x2", "y")}
                if index == 17:  # poison: quarantined as it arrives (NaN), or by the step (its loss alone is inf)
                    fields["y" if chunk % 100 else "x0"] = "nan" if chunk % 100 else "1e200"
                pipe.xadd("events", fields)
            ids = [i.decode() for i in pipe.execute()]
            produced.extend(ids)
            poison.add(ids[17])
            time.sleep(0.2)

    producer = threading.Thread(target=produce)
    producer.start()
    checkpoint_dir, log = tmp_path / "ckpt", tmp_path / "log.txt"
    rng = random.Random(int(os.environ.get("BATCHFIT_KILL_SEED", "7")))
    kills = 0
    try:
        for _ in range(3):
            worker = _start(redis_server, checkpoint_dir, log)
            deadline = time.monotonic() + 60
            while _steps_since_last_resume(log) == 0 and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)  # until this incarnation is training
            time.sleep(rng.uniform(0.05, 0.8))
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                kills += 1
            worker.wait()
    finally:
        producer.join()
    final = _start(redis_server, checkpoint_dir, log)
    assert final.wait(timeout=120) == 0
    assert log.read_text().endswith("done\n")
    lineage, logged = _lineage(log)
    counts = collections.Counter(i for ids in lineage.values() for i in ids)
    assert len(produced) == EVENTS and kills >= 1 and len(poison) == EVENTS // 50
    assert set(counts) == set(produced) - poison, "events lost, or a poison event trained"
    assert max(counts.values()) == 1, "an event is in the final weights twice"
    trained = sum(len(lineage[s]) for s in lineage)
    assert sorted(lineage) == list(range(1, len(lineage) + 1))
    # Steps trained again after a kill: at most one checkpoint interval per kill.
    assert logged - len(lineage) <= kills * CHECKPOINT_EVERY, (logged, len(lineage), kills)
    assert trained == EVENTS - len(poison)
    # Every poison event is in the dead-letter stream (again, when a kill lost its acknowledgement).
    letters = [(f[b"batchfit.id"].decode(), f[b"batchfit.reason"].decode()) for _, f in client.xrange("events:dead")]
    assert {event_id for event_id, _ in letters} == poison
    assert any("its loss alone is" in reason for _, reason in letters)  # found by the step
    assert any("field 'y': nan is not a finite number" in reason for _, reason in letters)  # as it arrived
    assert int(client.xpending("events", "g")["pending"]) == 0
    print(f"kills {kills}, steps logged {logged}, in the final lineage {len(lineage)}, "
          f"produced while killing: {len(produced)}")
    client.close()
