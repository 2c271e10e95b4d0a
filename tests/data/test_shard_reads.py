"""Rows read by pread in runs (shards/runs.py) equal rows read through the memory maps.

Past the mapping limit, a gather whose rows are sparse in the file (a uniform shuffle) is read
with one pread per run of rows instead of a page fault per row. Every shuffle mode must still
serve each sample once per epoch and the same batches as an ArraySource with the same seed, on
one rank or several, resumed mid-epoch or not, with either read path.
"""

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shards import _assert_batches_equal as _equal  # same folder: on sys.path under pytest

from batchfit.data.batcher import Batcher
from batchfit.data.shards import ShardSource, read_manifest, runs, span, uring, write_shards
from batchfit.data.shards import read as shard_read
from batchfit.data.sources import ArraySource
from batchfit.errors import ShardError

pytestmark = pytest.mark.skipif(not runs.AVAILABLE, reason="os.preadv is not available here")


LIMIT = {"bytes": 1}  # the sources' mapping limit, set by read_path


@pytest.fixture(params=["pread", "map", "span"])
def read_path(request, monkeypatch):
    """Every gather past the mapping limit read by pread, or every one through the maps; or
    ("span") every map within the limit, each array gathered by one take over all its shards."""
    monkeypatch.setattr(shard_read, "PREADS_PER_FAULT", 10**9 if request.param == "pread" else 0)
    monkeypatch.setitem(LIMIT, "bytes", 2**40 if request.param == "span" else 1)
    return request.param


@pytest.fixture
def preads(monkeypatch):
    """Counts the runs read by pread."""
    counted = {"runs": 0}
    real = runs.read_runs

    def counting(fd, plan, out, name):
        counted["runs"] += len(plan.offsets)
        real(fd, plan, out, name)

    monkeypatch.setattr(runs, "read_runs", counting)
    return counted


def _data(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 10, n)


def _sources(tmp_path, named=False, shard_size=None, n=1000):
    x, y = _data(n)
    arrays = {"x": x, "y": y} if named else (x, y)
    memory = ArraySource(**arrays) if named else ArraySource(*arrays)
    write_shards(tmp_path / "s", arrays, shard_size=shard_size)
    return memory, ShardSource(tmp_path / "s", max_mapped_bytes=LIMIT["bytes"])  # 1: every read is counted




# --- planning runs ----------------------------------------------------------------------------


def test_plan_runs_rows_far_apart_go_straight_to_their_places():
    plan = runs.plan_runs(np.array([5000, 3, 90000]), header_bytes=128, row_bytes=100)
    assert plan.offsets.tolist() == [128 + 300, 128 + 500000, 128 + 9000000]  # in file order
    assert plan.sizes.tolist() == [100, 100, 100]
    assert plan.starts.tolist() == [100, 0, 200] and plan.scatter is None  # output rows 1, 0, 2


def test_plan_runs_joins_near_rows_and_keeps_order_and_duplicates():
    rows = np.array([40, 7, 9, 7, 100000, 8])
    plan = runs.plan_runs(rows, header_bytes=0, row_bytes=1024)  # 7-9: one run; 40 is 30 KiB further
    assert plan.offsets.tolist() == [7 * 1024, 40 * 1024, 100000 * 1024]
    assert plan.sizes.tolist() == [3 * 1024, 1024, 1024]
    assert plan.in_buffer is not None and plan.in_buffer.tolist() == [True, False, False]
    assert plan.starts.tolist() == [0, 0, 4 * 1024]  # 7-9 at the buffer's start; 40, 100000 to output rows 0, 4
    assert plan.buffer_rows == 3 and plan.scatter is not None
    destinations, buffer_rows = plan.scatter  # only the rows of 7-9, duplicates included
    assert sorted(zip(destinations.tolist(), buffer_rows.tolist())) == [(1, 0), (2, 2), (3, 0), (5, 1)]


@pytest.fixture(params=["io_uring", "pread"])
def reads(request, monkeypatch):
    """Every plan's runs submitted to io_uring (where the kernel allows it), or read one pread each."""
    if request.param == "io_uring" and uring.ring() is None:
        pytest.skip("io_uring is not available here")
    monkeypatch.setattr(runs, "URING_RUNS", 1 if request.param == "io_uring" else 10**9)
    return request.param


def test_read_runs_equals_indexing(tmp_path, reads):
    table = np.arange(5000 * 3, dtype=np.int32).reshape(5000, 3)
    path = tmp_path / "t.npy"
    np.save(path, table)
    header = os.path.getsize(path) - table.nbytes
    rng = np.random.default_rng(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        for rows in (rng.integers(0, 5000, 300), np.sort(rng.choice(5000, 40, replace=False)), np.arange(10, 20),
                     np.array([4999, 0, 4999]), rng.choice(5000, 40) * 100 % 5000):
            out = np.empty((len(rows), 3), np.int32)
            runs.read_runs(fd, runs.plan_runs(rows, header, 12), out, path)
            assert np.array_equal(out, table[rows])
            places = rng.permutation(len(rows) + 5)[: len(rows)]  # into rows of a larger output
            wide = np.zeros((len(rows) + 5, 3), np.int32)
            runs.read_runs(fd, runs.plan_runs(rows, header, 12, places), wide, path)
            assert np.array_equal(wide[places], table[rows])
    finally:
        os.close(fd)


# --- the Batcher over both read paths ---------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True, "full", "block"])
@pytest.mark.parametrize("shard_size", [None, 64])
def test_shard_reads_batches_equal_array_source(tmp_path, read_path, preads, shuffle, shard_size):
    memory, shards = _sources(tmp_path, shard_size=shard_size)
    options = dict(batch_size=48, shuffle=shuffle, seed=5, block_size=40, window_blocks=4)
    for epoch in range(2):
        a, b = Batcher(memory, **options), Batcher(shards, **options)
        a.set_epoch(epoch), b.set_epoch(epoch)
        seen = []
        for batch_a, batch_b in zip(a, b, strict=True):
            _equal(batch_a, batch_b)
            seen.append(batch_b[1])
    assert (preads["runs"] > 0) == (read_path == "pread")
    served = np.concatenate([s.numpy() for s in seen])
    assert len(served) == len(memory)  # every sample once: the labels are the data's, in some order
    assert np.array_equal(np.sort(served), np.sort(memory.tensors[1].numpy()))


def test_shard_reads_each_sample_once_per_epoch(tmp_path, read_path):
    n = 997
    ids = np.arange(n)
    write_shards(tmp_path / "ids", (np.stack([ids, -ids], 1).astype(np.int64), ids), shard_size=100)
    shards = ShardSource(tmp_path / "ids", max_mapped_bytes=LIMIT["bytes"])
    for shuffle in (True, "full", "block"):
        batcher = Batcher(shards, batch_size=64, shuffle=shuffle, seed=3, block_size=16, window_blocks=4)
        for _ in range(2):
            served = np.concatenate([x[:, 0].numpy() for x, _ in batcher])
            assert np.array_equal(np.sort(served), ids)


@pytest.mark.parametrize("shuffle", [False, "full", "block"])
@pytest.mark.parametrize("named", [False, True])
def test_shard_reads_two_ranks_share_each_batch_as_one_process(tmp_path, read_path, named, shuffle):
    memory, shards = _sources(tmp_path, named=named, shard_size=50)
    options = dict(batch_size=64, seed=2, shuffle=shuffle, block_size=40, window_blocks=4)
    whole = list(Batcher(memory, **options))
    ranks = [list(Batcher(shards, rank=r, world_size=2, **options)) for r in range(2)]
    for batch, first, second in zip(whole, *ranks, strict=True):
        if named:
            joined = {key: torch.cat([first[key], second[key]]) for key in batch}
        else:
            joined = tuple(torch.cat([a, b]) for a, b in zip(first, second))
        _equal(batch, joined)


@pytest.mark.parametrize("shuffle", ["full", "block"])
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("shard_size", [None, 40])
def test_shard_reads_state_dict_resumes_mid_epoch(tmp_path, read_path, prefetch, shard_size, shuffle):
    memory, shards = _sources(tmp_path, shard_size=shard_size)
    expected = list(Batcher(memory, batch_size=32, seed=4, shuffle=shuffle, block_size=40, window_blocks=4))
    first = Batcher(shards, batch_size=32, seed=4, shuffle=shuffle, prefetch=prefetch, block_size=40,
                    window_blocks=4)
    served = []
    for batch in first.remaining():
        served.append(batch)
        if len(served) == 5:
            break
    resumed = Batcher(shards, batch_size=32, seed=4, shuffle=shuffle, prefetch=prefetch, block_size=40,
                      window_blocks=4)
    resumed.load_state_dict(first.state_dict())
    served += list(resumed.remaining())
    for a, b in zip(expected, served, strict=True):
        _equal(a, b)


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_shard_reads_pread_maps_nothing(tmp_path, read_path, preads):
    if read_path == "span":
        pytest.skip("32 MiB of maps past an 8 MiB limit: no span")
    rows = 2**15  # 32 MiB of 1 KiB samples
    write_shards(tmp_path / "s", (np.full((4096, 256), i, dtype=np.float32) for i in range(rows // 4096)))
    src = ShardSource(tmp_path / "s", max_mapped_bytes=8 * 2**20)
    before = _rss_file_kib()
    peak = before
    for _ in Batcher(src, batch_size=256, shuffle="full"):
        peak = max(peak, _rss_file_kib())
    growth = (peak - before) * 1024
    if read_path == "pread":
        assert preads["runs"] > 0 and growth < 2**20
    else:
        assert growth < 2 * 8 * 2**20 + 2**20


def test_shard_reads_file_shorter_than_its_manifest_names_it(tmp_path, monkeypatch, reads):
    # The pread path only: a memory map of a truncated file faults (SIGBUS); the size checks at
    # open and at each epoch find that case (tests/data/test_shards_faults.py).
    monkeypatch.setattr(shard_read, "PREADS_PER_FAULT", 10**9)
    _, shards = _sources(tmp_path)
    shards.gather(np.array([1, 2]))  # the files are open
    name = tmp_path / "s" / read_manifest(tmp_path / "s")["shards"][0]["files"]["0"]["name"]
    os.truncate(name, 1000)
    with pytest.raises(ShardError, match="ends at byte"):
        shards.gather(np.array([999, 0]))


def test_shard_reads_cold_files_ask_the_kernel_ahead(tmp_path, monkeypatch, preads):
    """A file whose preads wait for the disk gets its runs announced (POSIX_FADV_WILLNEED) first;
    the rows are the same."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise")
    monkeypatch.setattr(shard_read, "PREADS_PER_FAULT", 10**9)
    announced = []
    real = runs.will_need
    monkeypatch.setattr(runs, "will_need", lambda fd, plan: (announced.append(len(plan.offsets)), real(fd, plan)))
    monkeypatch.setattr(shard_read, "JOIN_BYTES", 1)  # one gather a batch: 16 an epoch
    memory, shards = _sources(tmp_path)
    monkeypatch.setattr(runs, "COLD_SECONDS", 0.0)  # every read counts as waiting for the disk
    monkeypatch.setattr(runs, "WARM_SECONDS", -1.0)
    for a, b in zip(Batcher(memory, batch_size=64, seed=1), Batcher(shards, batch_size=64, seed=1), strict=True):
        _equal(a, b)
    assert len(announced) == 2 * 16 - 2  # both arrays, every gather after each array's first
    monkeypatch.setattr(runs, "COLD_SECONDS", 1.0)  # now every read counts as served by the cache
    monkeypatch.setattr(runs, "WARM_SECONDS", 1.0)
    announced.clear()
    list(Batcher(shards, batch_size=64, seed=1))
    assert len(announced) == 2  # the first gather of each array, still marked cold


# --- one take over all shards while every map fits the limit (shards/span.py) -----------------


@pytest.mark.parametrize("sizes", [[5], [4, 4, 4, 2], [0, 3, 0, 5], [3, 5, 7], [2048] * 97 + [1360], [1] * 10,
                                   [6, 6, 0], [12, 18, 6], [2**17, 2**17, 5]])
def test_shard_finder_names_the_shard_of_every_sample(sizes, monkeypatch):
    for entries in (span.TABLE_ENTRIES, 1):  # 1: every folder too irregular for a table
        monkeypatch.setattr(span, "TABLE_ENTRIES", entries)
        indices = np.random.default_rng(0).permutation(sum(sizes))
        expected = np.searchsorted(np.cumsum(sizes), indices, side="right")
        assert np.array_equal(span.shard_finder(sizes)(indices), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("row", [(), (3,), (16,), (2, 5)])
def test_span_over_separate_arrays_equals_their_concatenation(dtype, row):
    """Arrays anywhere in memory (rows on a fine grid: a non-contiguous view) or page-aligned maps."""
    rng = np.random.default_rng(1)
    sizes = [7, 0, 30, 1, 12]
    arrays = [rng.integers(0, 100, (n, *row)).astype(dtype) for n in sizes]
    joined = np.concatenate(arrays)
    indices = np.concatenate([rng.permutation(len(joined)), [0, len(joined) - 1, 3, 3]])
    spanned = span.Span(arrays, [0, *np.cumsum(sizes).tolist()])
    out = np.empty((len(indices), *row), dtype)
    spanned.take(spanned.rows(indices, span.shard_finder(sizes)(indices)), out)
    assert np.array_equal(out, joined[indices])
    assert not spanned.view.flags.writeable


@pytest.mark.parametrize("width", [3, 16])  # 12-byte rows: overlapping view rows; 64-byte rows: contiguous
def test_shard_reads_span_gathers_from_all_shards_in_one_take(tmp_path, width):
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((1000, width)).astype(np.float32), rng.integers(0, 10, 1000)
    shards = write_shards(tmp_path / "s", {"x": x, "y": y}, shard_size=30)
    indices = rng.permutation(1000)[:300]
    batch = shards.gather(indices)
    assert np.array_equal(batch["x"].numpy(), x[indices]) and np.array_equal(batch["y"].numpy(), y[indices])
    direct, spans = shards._direct
    assert direct and set(spans) == {"x", "y"}
    assert spans["x"].contiguous == (width == 16) and spans["y"].contiguous


def test_shard_reads_gather_batches_equal_one_gather_a_batch(tmp_path, read_path):
    memory, shards = _sources(tmp_path, named=True, shard_size=64)
    parts = np.array_split(np.random.default_rng(3).permutation(len(memory)), [5, 5, 300, 301])
    for part, batch in zip(parts, shards.gather_batches(parts), strict=True):
        _equal(memory.gather(part), batch)


def test_shard_reads_close_between_batches_keeps_them_equal(tmp_path, read_path):
    memory, shards = _sources(tmp_path, shard_size=64)
    for index, (a, b) in enumerate(zip(Batcher(memory, batch_size=32, seed=6),
                                       Batcher(shards, batch_size=32, seed=6, prefetch=2), strict=True)):
        _equal(a, b)
        if index % 5 == 0:
            shards.close()  # the maps (and spans) are opened again by the next gather


# --- io_uring ---------------------------------------------------------------------------------


def test_uring_failure_falls_back_to_pread_for_good(tmp_path, monkeypatch):
    table = np.arange(4000 * 4, dtype=np.float32).reshape(4000, 4)
    np.save(tmp_path / "t.npy", table)
    header = os.path.getsize(tmp_path / "t.npy") - table.nbytes

    class Broken:
        def read(self, *args):
            raise OSError(22, "io_uring_enter: Invalid argument")

    monkeypatch.setattr(uring, "ring", lambda: Broken())
    monkeypatch.setattr(runs, "URING_RUNS", 1)
    monkeypatch.setattr(uring, "_UNAVAILABLE", False)
    rows = np.random.default_rng(4).integers(0, 4000, 500)
    out = np.empty((500, 4), np.float32)
    fd = os.open(tmp_path / "t.npy", os.O_RDONLY)
    try:
        runs.read_runs(fd, runs.plan_runs(rows, header, 16), out, "t.npy")
    finally:
        os.close(fd)
    assert np.array_equal(out, table[rows]) and uring._UNAVAILABLE


def test_uring_rings_are_per_thread_and_reads_complete_in_any_order(tmp_path):
    if uring.ring() is None:
        pytest.skip("io_uring is not available here")
    data = np.random.default_rng(5).integers(0, 255, 3 * uring.ENTRIES * 64, dtype=np.uint8)
    (tmp_path / "d").write_bytes(data.tobytes())
    offsets = np.random.default_rng(6).permutation(len(data) // 64)[: 2 * uring.ENTRIES + 7] * 64  # 3 submissions
    out = np.zeros((len(offsets), 64), np.uint8)
    fd = os.open(tmp_path / "d", os.O_RDONLY)
    rings = []
    try:
        def read() -> None:
            rings.append(uring.ring())
            got = rings[-1].read(fd, offsets, np.full(len(offsets), 64), out.ctypes.data + 64 * np.arange(len(offsets)))
            assert (got == 64).all()

        read()
        thread = threading.Thread(target=read)
        thread.start(), thread.join()
        assert rings[0] is not rings[1] and rings[0] is uring.ring()
        ends = np.array([len(data) - 10, len(data)])
        tail = rings[0].read(fd, ends, np.array([64, 64]), out.ctypes.data + np.array([0, 64]))
        assert tail.tolist() == [10, 0]  # short reads at the end of the file are reported, not hidden
    finally:
        os.close(fd)
    assert np.array_equal(out[2:], data.reshape(-1, 64)[offsets[2:] // 64])
