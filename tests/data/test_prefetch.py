"""Prefetching in a thread only where it pays: where producing a batch and using it both take
long enough for one to overlap the other; otherwise batches stay in the caller's thread."""

import threading
import time

import numpy as np
import pytest
import torch

from batchfit.data import prefetch
from batchfit.data.batcher import Batcher


def in_prefetch_thread() -> bool:
    return threading.current_thread().name == "batchfit-prefetch"


def produced(count: int, seconds: float = 0.0, seen=None):
    for i in range(count):
        if seconds:
            time.sleep(seconds)
        if seen is not None:
            seen.append(in_prefetch_thread())
        yield i


def test_prefetch_quick_items_stay_in_the_callers_thread(monkeypatch):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 0.02)  # a margin for a busy machine
    threads: list[bool] = []
    items = list(prefetch.prefetch_iter(produced(50, seen=threads), depth=2))
    assert items == list(range(50))
    assert not any(threads)


def used(items, seconds: float) -> list:
    """A caller that spends ``seconds`` with each item."""
    kept = []
    for item in items:
        time.sleep(seconds)
        kept.append(item)
    return kept


def test_prefetch_slow_items_used_slowly_move_to_a_thread_after_one_probe(monkeypatch):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 1e-3)
    threads: list[bool] = []
    items = used(prefetch.prefetch_iter(produced(20, seconds=3e-3, seen=threads), depth=2), 3e-3)
    assert items == list(range(20))
    assert not any(threads[: prefetch.PROBE_BATCHES])  # probed in the caller's thread ...
    assert all(threads[prefetch.PROBE_BATCHES :])  # ... then produced in the thread


@pytest.mark.parametrize(("produce", "use"), [(3e-3, 0.0), (0.0, 3e-3)])
def test_prefetch_nothing_to_overlap_stays_in_the_callers_thread(monkeypatch, produce, use):
    """Slow items used at once, or quick items used slowly: a thread would only add hand-overs."""
    # Just under the 3 ms side (a sleep never ends early), far above the quick side: a busy
    # machine would have to stall the quick side 20 ms in one probe to make it look slow.
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 2.5e-3)
    threads: list[bool] = []
    assert used(prefetch.prefetch_iter(produced(20, seconds=produce, seen=threads), depth=2), use) == list(range(20))
    assert not any(threads)


def test_prefetch_items_that_become_slow_move_to_a_thread(monkeypatch):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 1e-3)

    threads: list[bool] = []

    def quick_then_slow():
        yield from produced(30, seen=threads)
        yield from (i + 30 for i in produced(100, seconds=3e-3, seen=threads))

    # untimed between probes while quick, so the switch comes within PROBE_BATCHES**2 + 2 probes
    assert used(prefetch.prefetch_iter(quick_then_slow(), depth=2), 3e-3) == list(range(130))
    assert not any(threads[:30]) and all(threads[-10:])


def test_prefetch_thread_reraises_and_stops(monkeypatch):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 0.0)

    def failing():
        yield 1
        yield 2
        raise RuntimeError("broken source")

    with pytest.raises(RuntimeError, match="broken source"):
        list(prefetch.thread_prefetch(failing(), depth=2))
    iterator = prefetch.prefetch_iter(produced(1000), depth=2)
    assert next(iterator) == 0
    iterator.close()


def _slow_double(batch, threads=None):
    time.sleep(2e-3)
    if threads is not None:
        threads.append(in_prefetch_thread())
    x, y = batch
    return x * 2, y


@pytest.mark.parametrize("shuffle", [False, True, "block"])
def test_batcher_prefetch_slow_transform_same_batches(monkeypatch, shuffle):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 1e-3)
    x, y = np.arange(400, dtype=np.float32).reshape(200, 2), np.arange(200)
    plain = list(Batcher((x, y), batch_size=8, seed=3, shuffle=shuffle, transform=_slow_double))
    threads: list[bool] = []
    ahead = Batcher((x, y), batch_size=8, seed=3, shuffle=shuffle, prefetch=2,
                    transform=lambda batch: _slow_double(batch, threads))
    for (xa, ya), (xb, yb) in zip(plain, used(ahead, 2e-3), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not threads[0] and all(threads[prefetch.PROBE_BATCHES:])


def test_batcher_prefetch_from_memory_stays_in_the_callers_thread(monkeypatch):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 0.02)  # a margin for a busy machine
    x, y = np.zeros((5000, 4), np.float32), np.arange(5000)
    threads: list[bool] = []

    def record(batch):
        threads.append(in_prefetch_thread())
        return batch

    assert len(list(Batcher((x, y), batch_size=16, prefetch=2, transform=record))) == len(threads) == 313
    assert not any(threads)


def _busy(seconds: float) -> None:
    """Python work that holds the GIL: a thread cannot overlap it with anything."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_prefetch_thread_that_does_not_pay_hands_back_and_stops(monkeypatch):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 1e-3)
    monkeypatch.setattr(prefetch, "KEEP_BELOW", 0.5)  # kept only if twice as fast: never, under the GIL
    threads: list[bool] = []

    def produced_busy(count):
        for i in range(count):
            _busy(2e-3)
            threads.append(in_prefetch_thread())
            yield i

    served = []
    for item in prefetch.prefetch_iter(produced_busy(80), depth=2):
        _busy(2e-3)
        served.append(item)
    assert served == list(range(80))  # nothing lost or repeated when the thread hands back
    probe = prefetch.PROBE_BATCHES
    assert not any(threads[:probe]) and any(threads[probe : 2 * probe])  # tried after one probe ...
    assert not all(threads[2 * probe + 2 :])  # ... and given up: the caller produces again


def test_prefetch_thread_hands_back_at_the_end_of_the_items(monkeypatch):
    monkeypatch.setattr(prefetch, "PAYS_SECONDS", 0.0)
    monkeypatch.setattr(prefetch, "KEEP_BELOW", 0.0)  # never faster: every probe in the thread hands back
    for count in range(0, 40, 3):
        assert used(prefetch.prefetch_iter(produced(count), depth=3), 1e-4) == list(range(count))
