"""Two trainers (gloo ranks) on one Redis stream: disjoint events, each step the union of the ranks' batches,
the same weights as one process that trained on the same events in the same steps; a dead consumer's pending
events are claimed by the ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import batchfit as bf
from batchfit.distributed import DistContext
from batchfit.train.stream_ranks import StreamRanks, allocate, shares

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_stream_ranks_worker.py")
FIELDS = ("x0", "x1", "x2", "y")
WORLD = 2


def _rows(count: int, seed: int = 0) -> list[tuple[float, float, float, float]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 3))
    y = x @ np.array([0.5, -1.0, 2.0]) + 0.1 * rng.standard_normal(count)
    return [(float(a), float(b), float(c), float(t)) for (a, b, c), t in zip(x, y)]


def _produce(url: str, rows) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.xadd("events", dict(zip(FIELDS, map(repr, row))))
    ids = [i.decode() for i in pipe.execute()]
    client.close()
    return ids


def _launch(url: str, folder: Path, world: int = WORLD, expect_ok: bool = True, outputs: list[str] | None = None,
            **options) -> list[Path]:
    """Run the worker on ``world`` ranks (1: a plain process, no process group); returns each rank's OUT path
    (and appends each rank's output to ``outputs``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outs = [folder / f"rank{rank}-{time.monotonic_ns()}.pt" for rank in range(world)]
    processes = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(world), BATCHFIT_DIST_TIMEOUT="60")
        command = [sys.executable, str(WORKER), url, str(outs[rank]), json.dumps(options)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    if outputs is not None:
        outputs += logs
    if expect_ok:
        for process, log in zip(processes, logs):
            assert process.returncode == 0, log[-3000:]
    return outs


def _run(url: str, folder: Path, **options) -> list[dict]:
    """:func:`_launch`, then each rank's results."""
    return [torch.load(out, weights_only=False) for out in _launch(url, folder, **options)]


def _lineage(log: Path) -> list[tuple[int, list[str]]]:
    """(step, ids) of the steps a rank's log says it trained, the steps after a resume replacing the lost ones."""
    steps: dict[int, list[str]] = {}
    for line in log.read_text().splitlines():
        word, number, *ids = line.split(" ")
        if word == "resume":
            steps = {k: v for k, v in steps.items() if k <= int(number)}
        else:
            steps[int(number)] = ids
    return sorted(steps.items())


def _single_process(rows_by_id: dict[str, tuple], steps: list[list[str]], sparse: bool = False) -> bf.Trainer:
    """One process trained on the same events, step by step (the union of the ranks' batches)."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from _stream_ranks_worker import make_sparse_trainer, make_trainer
    finally:
        sys.path.remove(str(WORKER.parent))
    trainer = make_sparse_trainer() if sparse else make_trainer()
    sizes = {len(ids) for ids in steps[:-1]}
    assert len(sizes) == 1, f"every step but the last has the batch size: {sizes}"
    trainer.fit(bf.StreamSource([rows_by_id[i] for ids in steps for i in ids]))
    return trainer


def test_stream_ranks_shares_and_allocation():
    assert shares(16, 2) == [8, 8] and shares(5, 2) == [3, 2]
    assert allocate([10, 10], 16) == [8, 8]
    assert allocate([20, 3], 16) == [13, 3]  # a starved rank: the other fills the batch
    assert allocate([0, 5], 16) == [0, 5]  # the end of the stream: what there is
    assert allocate([4, 30], 16) == [4, 12]


def test_stream_ranks_agreement_closes_by_size_by_latency_and_at_the_end():
    """The agreement's rules on one rank (the all-reduce is the identity): by size, on time, the rest at the end."""
    gate = threading.Event()
    rows = _rows(13)

    def produce():
        yield from rows[:8]
        yield from rows[8:11]
        gate.wait(30)  # the producer goes quiet: only the clock closes the batch of 3
        yield from rows[11:]

    ranks = StreamRanks(DistContext(), bf.StreamSource(produce(), max_latency=0.05), batch_size=8)
    taken = []
    for _ in range(2000):
        plan = ranks.plan(stop=False, signal=False)
        if plan.ended:
            break
        if plan.global_size:
            batch = ranks.take(plan)
            assert batch is not None and batch.size == plan.global_size
            taken.append((batch.size, batch.reason))
            if len(taken) == 2:
                gate.set()
    assert taken == [(8, "size"), (3, "latency"), (2, "end")]
    assert ranks.plan(stop=True, signal=False).stop


def test_stream_two_ranks_equal_one_process_on_the_same_events(redis_server, tmp_path, assert_close):
    rows = _rows(200)
    ids = _produce(redis_server, rows)
    results = _run(redis_server, tmp_path)
    per_rank = [[i for step in result["steps"] for i in step] for result in results]
    assert not set(per_rank[0]) & set(per_rank[1])  # disjoint events
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ids)  # every event once
    assert all(per_rank), "both ranks trained on events of their own"
    assert len(results[0]["steps"]) == len(results[1]["steps"]) == 13  # ceil(200 / 16)
    steps = [a + b for a, b in zip(results[0]["steps"], results[1]["steps"])]
    assert sum(1 for a, b in zip(*[r["steps"] for r in results]) if a and b) > 0  # steps both ranks fed
    expected = _single_process(dict(zip(ids, rows)), steps)
    for result in results:
        assert_close(result["weights"], expected.module.state_dict())
        assert [r["batch_size"] for r in result["history"]] == [16] * 12 + [8]
        for key in ("loss", "preq_loss", "preq_mae", "lr"):
            assert [r[key] for r in result["history"]] == pytest.approx(expected.history.column(key), rel=1e-5)
    assert results[0]["history"][-1]["lr"] < results[0]["history"][0]["lr"]  # the scheduler stepped per step


def test_stream_ranks_claim_the_pending_events_of_a_dead_consumer(redis_server, tmp_path):
    import redis

    rows = _rows(120)
    ids = _produce(redis_server, rows)
    client = redis.Redis.from_url(redis_server)
    client.xgroup_create("events", "g", id="0")
    taken = client.xreadgroup("g", "rank-dead", {"events": ">"}, count=20)[0][1]  # then the consumer dies
    assert len(taken) == 20
    # A live rank's events must not look abandoned while it starts or steps on a loaded machine: its
    # renewals come every claim_idle / 3 while it reads, so claim_idle is seconds, not a fraction.
    time.sleep(3.1)
    results = _run(redis_server, tmp_path, claim_idle=3.0)
    per_rank = [[i for step in result["steps"] for i in step] for result in results]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ids)  # the dead consumer's 20 included, none twice
    assert sum(result["redelivered"] for result in results) == 20
    assert results[0]["history"][-1]["redelivered"] == 20  # the count over both ranks, in the history
    assert int(client.xpending("events", "g")["pending"]) == 0
    client.close()


def test_stream_ranks_checkpoint_stop_and_resume_lose_no_event_and_equal_one_process(redis_server, tmp_path,
                                                                                      assert_close):
    import redis

    rows = _rows(160)
    ids = _produce(redis_server, rows)
    folder = tmp_path / "checkpoints"
    first = _run(redis_server, tmp_path, checkpoint_dir=str(folder), stop_at=5)  # rank 1 asks to stop
    assert [len(result["steps"]) for result in first] == [5, 5]  # both ranks stop after the same step
    client = redis.Redis.from_url(redis_server)
    pending = {entry["message_id"].decode() for entry in client.xpending_range("events", "g", "-", "+", 1000)}
    trained = {i for result in first for step in result["steps"] for i in step}
    assert trained and not pending & trained  # acknowledged once checkpointed; read but not trained: still pending
    saved = torch.load(sorted(folder.glob("step-*.pt"))[-1], weights_only=True)
    assert saved["step"] == 5 and len(saved["stream"]["ranks"]) == WORLD
    # Each id pending at the checkpoint listed once over both ranks: the included ones (steps 4 and 5, since the
    # checkpoint of step 3), and the others read but not trained (still pending now).
    stored = [i for state in saved["stream"]["ranks"] for i in state["included"]]
    stored += [i for state in saved["stream"]["ranks"] for i in state.get("position", {}).get("pending", [])]
    since_ack = {i for result in first for step in result["steps"][3:] for i in step}
    assert len(stored) == len(set(stored)) and set(stored) == since_ack | pending
    second = _run(redis_server, tmp_path, checkpoint_dir=str(folder))
    steps = [a + b for a, b in zip(first[0]["steps"], first[1]["steps"])]
    steps += [a + b for a, b in zip(second[0]["steps"], second[1]["steps"])]
    used = [i for step in steps for i in step]
    assert sorted(used) == sorted(ids)  # every event once across the stop and the resume
    expected = _single_process(dict(zip(ids, rows)), steps)
    for result in second:
        assert_close(result["weights"], expected.module.state_dict())
        assert result["history"][-1]["preq_loss"] == pytest.approx(expected.history.column("preq_loss")[-1],
                                                                   rel=1e-5)
    assert int(client.xpending("events", "g")["pending"]) == 0
    client.close()


def test_stream_two_ranks_with_sparse_embeddings_equal_one_process(redis_server, tmp_path, assert_close):
    import redis

    rng = np.random.default_rng(1)
    rows = [(int(u), int(i), float(r)) for u, i, r in zip(rng.integers(0, 20, 96), rng.integers(0, 30, 96),
                                                           rng.integers(1, 6, 96))]
    client = redis.Redis.from_url(redis_server)
    ids = [client.xadd("events", {"user": str(u), "item": str(i), "rating": repr(r)}).decode() for u, i, r in rows]
    client.close()
    results = _run(redis_server, tmp_path, sparse=True)
    steps = [a + b for a, b in zip(results[0]["steps"], results[1]["steps"])]
    assert sorted(i for step in steps for i in step) == sorted(ids) and all(len(s) == 16 for s in steps)
    expected = _single_process(dict(zip(ids, rows)), steps, sparse=True)
    for result in results:
        assert_close(result["weights"], expected.module.state_dict())


def test_stream_ranks_a_killed_rank_resumes_on_one_process_without_losing_an_event(redis_server, tmp_path):
    """kill -9 of rank 1 mid-run: rank 0 stops; one process resumes from the checkpoint, claims what rank 1 had
    read, and the weights' lineage (steps up to the checkpoint, then the resumed ones) holds every event once."""
    import redis

    rows = _rows(200)
    ids = _produce(redis_server, rows)
    folder = tmp_path / "checkpoints"
    outs = _launch(redis_server, tmp_path, expect_ok=False, checkpoint_dir=str(folder), kill_at=7)
    assert not any(out.exists() for out in outs)  # neither rank finished
    saved = torch.load(sorted(folder.glob("step-*.pt"))[-1], weights_only=True)
    assert saved["step"] == 6 and len(saved["stream"]["ranks"]) == WORLD  # checkpoints every 3 steps
    client = redis.Redis.from_url(redis_server)
    owners = {entry["consumer"].decode() for entry in client.xpending_range("events", "g", "-", "+", 1000)}
    assert "rank-1" in owners  # the dead rank left events pending
    time.sleep(0.6)
    resumed = _launch(redis_server, tmp_path, world=1, checkpoint_dir=str(folder), claim_idle=0.5)[0]
    result = torch.load(resumed, weights_only=False)
    first = [_lineage(Path(str(out) + ".log")) for out in outs]
    before = [a + b for (step, a), (_, b) in zip(*first) if step <= 6]
    after = [ids_ for _, ids_ in _lineage(Path(str(resumed) + ".log"))]
    lineage = [i for step in before + after for i in step]
    assert sorted(lineage) == sorted(ids)  # every event in the final weights exactly once
    assert result["redelivered"] > 0 and int(client.xpending("events", "g")["pending"]) == 0
    client.close()


def test_stream_ranks_quarantine_poison_events_and_train_the_rest_as_one_process_would(redis_server, tmp_path,
                                                                                      assert_close):
    import redis

    rows = _rows(200)
    ids = _produce(redis_server, rows[:30])
    client = redis.Redis.from_url(redis_server)
    poison = [client.xadd("events", {"x0": "1.0", "x1": "0.5", "x2": "0.1", "y": "nan"}).decode()]  # on arrival
    ids += _produce(redis_server, rows[30:77])
    poison.append(client.xadd("events", {"x0": "1e200", "x1": "0.5", "x2": "0.1", "y": "1"}).decode())  # by the step
    ids += _produce(redis_server, rows[77:150])
    poison.append(client.xadd("events", {"x0": "-1e200", "x1": "0.5", "x2": "0.1", "y": "1"}).decode())
    ids += _produce(redis_server, rows[150:])
    results = _run(redis_server, tmp_path)
    per_rank = [[i for step in result["steps"] for i in step] for result in results]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ids)  # every good event once, no poison one
    dead = {fields[b"batchfit.id"].decode(): fields[b"batchfit.reason"].decode()
            for _, fields in client.xrange("events:dead")}
    assert sorted(dead) == sorted(poison)
    assert "its loss alone is" in dead[poison[1]] and "nan is not a finite number" in dead[poison[0]]
    assert results[0]["history"][-1]["dead_letters"] + results[1]["history"][-1]["dead_letters"] == 3
    assert_close(results[0]["weights"], results[1]["weights"])
    # One process trained on the same steps (one fit of one step each: the same lr schedule and momentum).
    sys.path.insert(0, str(WORKER.parent))
    try:
        from _stream_ranks_worker import make_trainer
    finally:
        sys.path.remove(str(WORKER.parent))
    by_id = dict(zip(ids, rows))
    steps = [a + b for a, b in zip(results[0]["steps"], results[1]["steps"])]
    assert sorted(len(step) for step in steps)[:3] == [10, 15, 15]  # two steps lost a poison event; the last
    assert_one_process_trains_the_same(make_trainer(), steps, by_id, results, client, assert_close)


def test_stream_ranks_fall_back_past_a_damaged_checkpoint_and_read_the_acknowledged_events_again(
        redis_server, tmp_path, assert_close):
    import redis

    rows = _rows(160)
    ids = _produce(redis_server, rows)
    folder = tmp_path / "checkpoints"
    first = _run(redis_server, tmp_path, checkpoint_dir=str(folder), stop_at=7)  # checkpoints at steps 3, 6, 7
    assert [p.name for p in sorted(folder.glob("step-*.pt"))][-1] == "step-000000007.pt"
    os.truncate(folder / "step-000000007.pt", 1000)  # the events of step 7 are acknowledged, and in no checkpoint
    second = _run(redis_server, tmp_path, checkpoint_dir=str(folder))
    steps = [a + b for a, b in zip(first[0]["steps"], first[1]["steps"])][:6]
    steps += [a + b for a, b in zip(second[0]["steps"], second[1]["steps"])]
    assert sorted(i for step in steps for i in step) == sorted(ids)  # every event once: step 7's read again
    expected = _single_process(dict(zip(ids, rows)), steps)
    for result in second:
        assert_close(result["weights"], expected.module.state_dict())
    client = redis.Redis.from_url(redis_server)
    assert int(client.xpending("events", "g")["pending"]) == 0
    client.close()


def test_stream_ranks_quarantine_events_whose_step_raises_on_one_rank(redis_server, tmp_path, assert_close):
    """Ids past the embedding tables (no ranges= to catch them as they arrive) make one rank's forward raise
    IndexError: both ranks learn it in the step's all-reduce, nobody updates, the failing rank finds its poison
    by halves, and the step runs again on the rest; every good event is trained once, as one process would."""
    import redis

    rng = np.random.default_rng(2)
    rows = [(int(u), int(i), float(r)) for u, i, r in zip(rng.integers(0, 20, 120), rng.integers(0, 30, 120),
                                                           rng.integers(1, 6, 120))]
    bad = {7: (25, 3, 4.0), 40: (2, 31, 1.0), 41: (99, 99, 5.0), 93: (20, 0, 2.0)}  # users < 20, items < 30
    client = redis.Redis.from_url(redis_server)
    ids, poison, by_id = [], [], {}
    for index, row in enumerate(rows):
        if index in bad:
            u, i, r = bad[index]
            poison.append(client.xadd("events", {"user": str(u), "item": str(i), "rating": repr(r)}).decode())
        u, i, r = row
        ids.append(client.xadd("events", {"user": str(u), "item": str(i), "rating": repr(r)}).decode())
        by_id[ids[-1]] = row
    results = _run(redis_server, tmp_path, sparse=True)
    per_rank = [[i for step in result["steps"] for i in step] for result in results]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ids)  # every good event once, no poison one
    dead = {fields[b"batchfit.id"].decode(): fields[b"batchfit.reason"].decode()
            for _, fields in client.xrange("events:dead")}
    assert sorted(dead) == sorted(poison)
    assert all("IndexError" in reason for reason in dead.values()), dead
    assert results[0]["history"][-1]["dead_letters"] + results[1]["history"][-1]["dead_letters"] == len(bad)
    assert_close(results[0]["weights"], results[1]["weights"])
    steps = [a + b for a, b in zip(results[0]["steps"], results[1]["steps"])]
    assert sum(len(step) < 16 for step in steps[:-1]) >= 2  # steps that lost a poison event ran on the rest
    # One process trained on the same steps (one fit of one step each: SparseAdam's moments carry over).
    sys.path.insert(0, str(WORKER.parent))
    try:
        from _stream_ranks_worker import make_sparse_trainer
    finally:
        sys.path.remove(str(WORKER.parent))
    assert_one_process_trains_the_same(make_sparse_trainer(), steps, by_id, results, client, assert_close)


def test_stream_ranks_a_step_that_raises_on_one_rank_without_poison_raises_on_every_rank(redis_server, tmp_path):
    """Rank 1's step raises, but no event does on its own (the model fails only in training mode): both ranks
    stop with the same InputError instead of one waiting in a collective; the step's events stay pending."""
    import redis

    ids = _produce(redis_server, _rows(120))
    started = time.monotonic()
    outputs: list[str] = []
    outs = _launch(redis_server, tmp_path, expect_ok=False, outputs=outputs, fail_at=3)
    assert time.monotonic() - started < 120  # nobody hung until the collective's timeout
    for output in outputs:  # the same error on both ranks
        assert "InputError: step 3" in output and "rank 1 raised RuntimeError: a kernel failed" in output, output
    assert not any(out.exists() for out in outs)
    client = redis.Redis.from_url(redis_server)
    assert client.xlen("events:dead") == 0
    pending = {entry["message_id"].decode() for entry in client.xpending_range("events", "g", "-", "+", 1000)}
    trained = [_lineage(Path(str(out) + ".log")) for out in outs]
    assert [step for step, _ in trained[0]] == [step for step, _ in trained[1]] == [1, 2]
    assert pending <= set(ids) and len(pending) >= 16  # step 3's events (and any read after) are not acknowledged
    client.close()


def assert_one_process_trains_the_same(expected, steps, by_id, results, client, assert_close):
    """One process trained on the ranks' steps (one fit of one step each) ends on every rank's weights, and
    nothing is left pending in the group."""
    for step in steps:
        expected.fit(bf.StreamSource([by_id[i] for i in step]))
    for result in results:
        assert_close(result["weights"], expected.module.state_dict())
    assert int(client.xpending("events", "g")["pending"]) == 0
    client.close()
