import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from batchfit.data.batcher import Batcher
from batchfit.data.shards import MANIFEST, ShardSource, read_manifest, verify, write_shards
from batchfit.data.shards.read import JOIN_BYTES
from batchfit.data.sources import ArraySource
from batchfit.errors import BatchfitError, ShardError


def _data(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 10, n)


def _tokens(n=200, seed=0, inner=()):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, (int(rng.integers(0, 9)), *inner)) for _ in range(n)]


def _shard_file(path, shard=1, key="0"):
    return path / read_manifest(path)["shards"][shard]["files"][key]["name"]


def _assert_batches_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        a, b = list(a.values()), list(b.values())
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _padded(sequences, pad):
    longest = max((len(s) for s in sequences), default=0)
    inner = sequences[0].shape[1:]
    out = np.full((len(sequences), longest, *inner), pad, dtype=sequences[0].dtype)
    for row, s in enumerate(sequences):
        out[row, : len(s)] = s
    return torch.from_numpy(out), torch.tensor([len(s) for s in sequences], dtype=torch.int64)


# --- writing and reading ---------------------------------------------------------------------


def test_write_shards_tuple_round_trip(tmp_path):
    x, y = _data()
    src = write_shards(tmp_path / "s", (x, y), shard_size=128)
    assert len(src) == 1000 and src.names is None and len(src.shard_sizes) == 8
    indices = torch.tensor([999, 0, 500, 127, 128, 3])
    bx, by = src.gather(indices)
    assert torch.equal(bx, torch.from_numpy(x)[indices]) and torch.equal(by, torch.from_numpy(y)[indices])


def test_write_shards_files_are_memory_mappable_npy(tmp_path):
    x, y = _data()
    write_shards(tmp_path / "s", {"x": x, "y": y}, shard_size=300)
    part = np.load(_shard_file(tmp_path / "s", shard=1, key="x"), mmap_mode="r")
    np.testing.assert_array_equal(part, x[300:600])
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["names"] == ["x", "y"]
    assert [s["samples"] for s in manifest["shards"]] == [300, 300, 300, 100]
    assert manifest["arrays"][0] == {"key": "x", "dtype": "<f4", "shape": [6], "ragged": False}


@pytest.mark.parametrize("shuffle", [False, "full", "block"])
@pytest.mark.parametrize("named", [False, True])
def test_shard_source_batches_equal_array_source(tmp_path, shuffle, named):
    x, y = _data(1000)
    arrays = {"x": x, "y": y} if named else (x, y)
    memory = ArraySource(**arrays) if named else ArraySource(*arrays)
    shards = write_shards(tmp_path / "s", arrays, shard_size=97)
    options = dict(batch_size=64, shuffle=shuffle, seed=3, block_size=50, window_blocks=3)
    for epoch in range(2):
        a, b = Batcher(memory, **options), Batcher(shards, **options)
        a.set_epoch(epoch), b.set_epoch(epoch)
        pairs = list(zip(a, b, strict=True))
        assert len(pairs) == 16
        for batch_a, batch_b in pairs:
            _assert_batches_equal(batch_a, batch_b)


@pytest.mark.parametrize("named", [False, True])
def test_shard_source_batches_equal_when_maps_are_dropped_all_the_time(tmp_path, named):
    x, y = _data(300)
    arrays = {"x": x, "y": y} if named else (x, y)
    memory = ArraySource(**arrays) if named else ArraySource(*arrays)
    shards = write_shards(tmp_path / "s", arrays, shard_size=70)
    tiny = ShardSource(tmp_path / "s", max_mapped_bytes=1)  # every read is counted, split and dropped
    for shuffle in (False, "full"):
        pairs = zip(Batcher(memory, batch_size=64, shuffle=shuffle), Batcher(tiny, batch_size=64, shuffle=shuffle))
        for batch_a, batch_b in pairs:
            _assert_batches_equal(batch_a, batch_b)
    assert len(shards) == 300


def test_write_shards_variable_length_with_maps_dropped_all_the_time(tmp_path):
    tokens = _tokens(inner=(2,))
    write_shards(tmp_path / "s", {"tokens": tokens}, shard_size=30)
    tiny = ShardSource(tmp_path / "s", max_mapped_bytes=1)
    indices = torch.randperm(200)[:50]
    padded, lengths = _padded([tokens[i] for i in indices], 0)
    batch = tiny.gather(indices)
    assert torch.equal(batch["tokens"], padded) and torch.equal(batch["tokens_lengths"], lengths)


def test_shard_source_batches_equal_with_prefetch(tmp_path):
    x, y = _data(500)
    shards = write_shards(tmp_path / "s", (x, y), shard_size=64)
    a = list(Batcher(ArraySource(x, y), batch_size=32, seed=1))
    b = list(Batcher(shards, batch_size=32, seed=1, prefetch=3))
    for batch_a, batch_b in zip(a, b, strict=True):
        _assert_batches_equal(batch_a, batch_b)


def test_write_shards_from_batches_equals_from_source(tmp_path):
    x, y = _data(1000)

    def batches():
        for lo in range(0, 1000, 37):  # batch sizes unrelated to the shard size
            yield torch.from_numpy(x[lo : lo + 37]), y[lo : lo + 37]

    from_source = write_shards(tmp_path / "a", ArraySource(x, y), shard_size=150)
    from_batches = write_shards(tmp_path / "b", batches(), shard_size=150)
    assert from_source.manifest["shards"] == from_batches.manifest["shards"]
    indices = torch.randperm(1000)
    _assert_batches_equal(from_source.gather(indices), from_batches.gather(indices))


def test_write_shards_default_shard_size_is_one_shard_for_small_data(tmp_path):
    x, y = _data(100)
    assert write_shards(tmp_path / "s", (x, y)).shard_sizes == [100]


def test_write_shards_metadata_kept(tmp_path):
    x, y = _data(10)
    src = write_shards(tmp_path / "s", (x, y), metadata={"classes": ["a", "b"]})
    assert ShardSource(tmp_path / "s").metadata == {"classes": ["a", "b"]}
    assert "10 samples in 1 shards" in src.summary()


def test_shard_source_pickle_round_trip(tmp_path):
    x, y = _data(100)
    src = write_shards(tmp_path / "s", (x, y), shard_size=30)
    src.gather(torch.arange(10))
    copy = pickle.loads(pickle.dumps(src))
    _assert_batches_equal(copy.gather(torch.arange(100)), src.gather(torch.arange(100)))


def test_shard_source_empty_indices_give_empty_batch(tmp_path):
    x, y = _data(100)
    bx, by = write_shards(tmp_path / "s", (x, y), shard_size=30).gather(torch.zeros(0, dtype=torch.int64))
    assert bx.shape == (0, 6) and by.shape == (0,)


# --- variable-length samples ---------------------------------------------------------------


@pytest.mark.parametrize("inner", [(), (2,)])
def test_write_shards_variable_length_round_trip_named(tmp_path, inner):
    tokens, labels = _tokens(inner=inner), np.arange(200)
    src = write_shards(tmp_path / "s", {"tokens": tokens, "y": labels}, shard_size=23, pad_value=-1)
    assert src.names == ("tokens", "tokens_lengths", "y")
    indices = torch.tensor([5, 199, 0, 23, 22, 100, 57])
    batch = src.gather(indices)
    padded, lengths = _padded([tokens[i] for i in indices], -1)
    assert torch.equal(batch["tokens"], padded) and torch.equal(batch["tokens_lengths"], lengths)
    assert torch.equal(batch["y"], torch.from_numpy(labels)[indices])


def test_write_shards_variable_length_tuple_lengths_follow_inputs_and_precede_target(tmp_path):
    tokens, targets = _tokens(seed=1), _tokens(seed=2)
    src = write_shards(tmp_path / "s", (tokens, targets), shard_size=50)
    indices = torch.tensor([3, 150, 70])
    got = src.gather(indices)
    x, x_lengths = _padded([tokens[i] for i in indices], 0)
    t, t_lengths = _padded([targets[i] for i in indices], 0)
    _assert_batches_equal(got, (x, x_lengths, t_lengths, t))


@pytest.mark.parametrize("inner", [(), (2,)])
def test_read_rows_and_take_give_single_arrays_unpadded(tmp_path, inner):
    tokens, labels = _tokens(inner=inner), np.arange(200) * 3
    named = write_shards(tmp_path / "named", {"tokens": tokens, "y": labels}, shard_size=23, pad_value=-1)
    tuples = write_shards(tmp_path / "tuples", (tokens, labels), shard_size=50)
    indices = np.array([5, 199, 0, 23, 22, 100, 57, 5])
    bounded = ShardSource(tuples.path, max_mapped_bytes=4096)  # past the mapping limit: read, not mapped whole
    for src, ragged, dense in ((named, "tokens", "y"), (tuples, 0, 1), (bounded, 0, 1)):
        rows = src.read_rows(torch.from_numpy(indices), ragged)
        assert len(rows) == len(indices)
        for row, index in zip(rows, indices):
            np.testing.assert_array_equal(row, np.asarray(tokens[index]))
            assert row.dtype == np.asarray(tokens[index]).dtype
        np.testing.assert_array_equal(src.take(indices, dense), labels[indices])
        with pytest.raises(BatchfitError, match="fixed-length array"):
            src.take(indices, ragged)
        with pytest.raises(BatchfitError, match="variable-length array"):
            src.read_rows(indices, dense)
    with pytest.raises(BatchfitError, match=r"'y_lengths'|y_lengths"):
        named.read_rows(indices, "y_lengths")
    with pytest.raises(BatchfitError, match="position"):
        tuples.take(indices, 2)
    with pytest.raises(BatchfitError, match="indices"):
        tuples.take(np.array([200]), 1)


def test_write_shards_variable_length_from_batches_of_lists(tmp_path):
    tokens, labels = _tokens(), np.arange(200)
    batches = ({"tokens": tokens[lo : lo + 30], "y": labels[lo : lo + 30]} for lo in range(0, 200, 30))
    streamed = write_shards(tmp_path / "a", batches, shard_size=64)
    whole = write_shards(tmp_path / "b", {"tokens": tokens, "y": labels}, shard_size=64)
    assert streamed.manifest["shards"] == whole.manifest["shards"]


def test_shard_source_variable_length_pad_value_override(tmp_path):
    write_shards(tmp_path / "s", {"tokens": [np.array([1, 2]), np.array([3])]}, pad_value=7)
    assert ShardSource(tmp_path / "s").gather(torch.tensor([1, 0]))["tokens"].tolist() == [[3, 7], [1, 2]]
    assert ShardSource(tmp_path / "s", pad_value=0).gather(torch.tensor([1]))["tokens"].tolist() == [[3]]


def test_write_shards_reshard_keeps_variable_length(tmp_path):
    tokens = _tokens()
    first = write_shards(tmp_path / "a", {"tokens": tokens}, shard_size=30)
    second = write_shards(tmp_path / "b", first, shard_size=70)
    assert second.shard_sizes == [70, 70, 60]
    indices = torch.randperm(200)
    _assert_batches_equal(first.gather(indices), second.gather(indices))


# --- refused input ----------------------------------------------------------------------------


def test_write_shards_existing_destination_refused(tmp_path):
    x, y = _data(10)
    write_shards(tmp_path / "s", (x, y))
    with pytest.raises(BatchfitError, match="overwrite=True"):
        write_shards(tmp_path / "s", (x * 2, y))
    replaced = write_shards(tmp_path / "s", (x * 2, y), overwrite=True)
    assert torch.equal(replaced.gather(torch.arange(10))[0], torch.from_numpy(x * 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_write_shards_overwrite_refuses_a_folder_that_is_not_shards(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("keep me")
    with pytest.raises(BatchfitError, match="neither"):
        write_shards(tmp_path / "s", _data(10), overwrite=True)
    assert (tmp_path / "s" / "notes.txt").exists()


def test_write_shards_mismatched_batch_refused(tmp_path):
    x, y = _data(20)
    batches = [(x[:10], y[:10]), (x[10:, :3], y[10:])]
    with pytest.raises(BatchfitError, match=r"batch 1 array '0'.*shape \(6,\).*shape \(3,\)"):
        write_shards(tmp_path / "s", batches)
    assert list(tmp_path.iterdir()) == []


def test_write_shards_no_samples_refused(tmp_path):
    with pytest.raises(BatchfitError, match="at least one sample"):
        write_shards(tmp_path / "s", iter([]))
    assert list(tmp_path.iterdir()) == []


def test_write_shards_bad_name_refused(tmp_path):
    with pytest.raises(BatchfitError, match="batch 0 key"):
        write_shards(tmp_path / "s", {"a/b": np.zeros(3)})


def test_write_shards_bad_shard_size_refused(tmp_path):
    with pytest.raises(BatchfitError, match="shard_size"):
        write_shards(tmp_path / "s", _data(10), shard_size=0)


def test_shard_source_out_of_range_indices_refused(tmp_path):
    src = write_shards(tmp_path / "s", _data(10))
    with pytest.raises(BatchfitError, match=r"indices.*\[0, 10\).*10"):
        src.gather(torch.tensor([0, 10]))


def test_shard_source_bad_verify_mode_refused(tmp_path):
    write_shards(tmp_path / "s", _data(10))
    with pytest.raises(BatchfitError, match="verify"):
        ShardSource(tmp_path / "s", verify="fast")


# --- damage -------------------------------------------------------------------------------------


def test_shard_source_flipped_byte_found_by_full_verify(tmp_path):
    write_shards(tmp_path / "s", _data(), shard_size=128)
    path = _shard_file(tmp_path / "s", shard=2)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(data)
    ShardSource(tmp_path / "s")  # same size: "open" does not read the data
    with pytest.raises(ShardError, match=f"{path.name} is corrupt: its blake2b checksum"):
        ShardSource(tmp_path / "s", verify="full")
    with pytest.raises(ShardError, match=path.name):
        verify(tmp_path / "s")


def test_shard_source_truncated_shard(tmp_path):
    write_shards(tmp_path / "s", _data(), shard_size=128)
    path = _shard_file(tmp_path / "s", shard=3, key="1")
    size = path.stat().st_size
    os.truncate(path, size - 8)
    with pytest.raises(ShardError, match=f"{path.name} has {size - 8} bytes, but the manifest says {size}"):
        ShardSource(tmp_path / "s")


def test_shard_source_missing_shard(tmp_path):
    write_shards(tmp_path / "s", _data(), shard_size=128)
    path = _shard_file(tmp_path / "s", shard=0)
    path.unlink()
    with pytest.raises(ShardError, match=f"{path.name} is missing"):
        ShardSource(tmp_path / "s")


def test_shard_source_missing_shard_found_lazily_without_verify(tmp_path):
    write_shards(tmp_path / "s", _data(), shard_size=128)
    path = _shard_file(tmp_path / "s", shard=1)
    path.unlink()
    src = ShardSource(tmp_path / "s", verify="none")
    src.gather(torch.arange(10))
    with pytest.raises(ShardError, match=f"{path.name} is missing"):
        src.gather(torch.arange(200))


def test_shard_source_missing_manifest(tmp_path):
    write_shards(tmp_path / "s", _data(10))
    (tmp_path / "s" / MANIFEST).unlink()
    with pytest.raises(ShardError, match=f"{MANIFEST} is missing"):
        ShardSource(tmp_path / "s")


def test_shard_source_missing_folder(tmp_path):
    with pytest.raises(ShardError, match="nowhere does not exist"):
        ShardSource(tmp_path / "nowhere")


def test_shard_source_unknown_version(tmp_path):
    write_shards(tmp_path / "s", _data(10))
    path = tmp_path / "s" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"{MANIFEST} has format version 99; this batchfit reads version 1"):
        ShardSource(tmp_path / "s")


def test_shard_source_malformed_manifest(tmp_path):
    write_shards(tmp_path / "s", _data(10))
    path = tmp_path / "s" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["files"]["0"]["name"] = "../elsewhere.npy"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"{MANIFEST} is malformed"):
        ShardSource(tmp_path / "s")


def test_shard_source_header_mismatch_names_file(tmp_path):
    write_shards(tmp_path / "s", _data(10))
    path = _shard_file(tmp_path / "s", shard=0)
    header = np.lib.format.read_magic, np.lib.format.read_array_header_1_0
    with open(path, "rb") as f:
        header[0](f)
        header[1](f)
        start = f.tell()
    data = path.read_bytes()
    np.save(path, np.frombuffer(data[start:], dtype=np.int32).reshape(10, 6))  # same size, other dtype
    src = ShardSource(tmp_path / "s")
    with pytest.raises(ShardError, match=f"{path.name} holds dtype int32"):
        src.gather(torch.arange(3))


# --- interrupted writes ---------------------------------------------------------------------------


def test_write_shards_generator_raising_leaves_nothing(tmp_path):
    x, y = _data(1000)

    def batches():
        for lo in range(0, 1000, 100):
            if lo == 600:
                raise RuntimeError("source failed")
            yield x[lo : lo + 100], y[lo : lo + 100]

    with pytest.raises(RuntimeError, match="source failed"):
        write_shards(tmp_path / "s", batches(), shard_size=100)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ShardError):
        ShardSource(tmp_path / "s")


_KILLED_WRITER = """
import sys, time
import numpy as np
from batchfit.data.shards import write_shards

def batches():
    for i in range(1000):
        if i == 5:
            print("written", flush=True)
            time.sleep(60)
        yield np.full((10, 4), i, dtype=np.float32), np.arange(10)

write_shards(sys.argv[1], batches(), shard_size=10)
"""


def test_write_shards_killed_mid_write_leaves_nothing_that_opens(tmp_path):
    dest = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(dest)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "written"
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".s.partial-")]
        assert len(partial) == 1 and len(list(partial[0].glob("*.npy"))) == 10  # 5 shards x 2 arrays
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    for folder in (dest, partial[0]):
        with pytest.raises(ShardError, match="does not exist|is missing"):
            ShardSource(folder)
    write_shards(dest, _data(10))  # a later write succeeds and removes the dead writer's leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


# --- resident memory ---------------------------------------------------------------------------


def _rss_file_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("shard_size", [8192, None])
def test_shard_source_resident_memory_stays_bounded(tmp_path, shard_size):
    rows = 2**16  # 64 MiB of 1 KiB samples, in 8 shards or in one
    batches = (np.full((4096, 256), i, dtype=np.float32) for i in range(rows // 4096))
    write_shards(tmp_path / "s", batches, shard_size=shard_size)
    bound = 8 * 2**20
    src = ShardSource(tmp_path / "s", max_mapped_bytes=bound)
    before = _rss_file_kib()
    peak = before
    for _ in Batcher(src, batch_size=1024, shuffle=True):
        assert src._resident <= bound
        peak = max(peak, _rss_file_kib())
    assert (peak - before) * 1024 < 2 * bound + 2**20  # far below the 64 MiB the epoch touched
    unbounded = ShardSource(tmp_path / "s", max_mapped_bytes=2**40)
    for _ in Batcher(unbounded, batch_size=1024, shuffle=True):
        pass
    assert (_rss_file_kib() - before) * 1024 > 32 * 2**20  # the measurement can see the difference
    del unbounded
    time.sleep(0)


# --- many shards: several batches gathered in one call -----------------------------------------


def _many_shards(tmp_path, named=False, n=1000, shard_size=25):
    x, y = _data(n)
    arrays = {"x": x, "y": y} if named else (x, y)
    memory = ArraySource(**arrays) if named else ArraySource(*arrays)
    return memory, write_shards(tmp_path / "s", arrays, shard_size=shard_size)


def test_batches_per_gather_joins_small_batches_up_to_join_bytes(tmp_path):
    _, shards = _many_shards(tmp_path)  # 40 shards, 32 bytes a sample
    assert shards.batches_per_gather(32) == JOIN_BYTES // (32 * 32)  # small batches share one gather
    wide = write_shards(tmp_path / "wide", (np.zeros((400, 2**10), np.float32),), shard_size=10)
    assert wide.batches_per_gather(128) == 4  # 512 KiB batches: 4 make JOIN_BYTES (2 MiB)
    assert wide.batches_per_gather(1024) == 1  # a 4 MiB batch is gathered alone
    tokens = write_shards(tmp_path / "tokens", {"tokens": _tokens(400)}, shard_size=10)
    assert tokens.batches_per_gather(64) == 1  # variable-length arrays are padded per batch


@pytest.mark.parametrize("shuffle", [False, "full", "block"])
@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_many_shards_batches_equal_array_source(tmp_path, shuffle, named, prefetch):
    memory, shards = _many_shards(tmp_path, named)
    options = dict(batch_size=48, shuffle=shuffle, seed=5, block_size=40, window_blocks=4)
    assert shards.batches_per_gather(48) > 1
    for epoch in range(2):
        a, b = Batcher(memory, **options), Batcher(shards, prefetch=prefetch, **options)
        a.set_epoch(epoch), b.set_epoch(epoch)
        for batch_a, batch_b in zip(a, b, strict=True):
            _assert_batches_equal(batch_a, batch_b)


def test_many_shards_two_ranks_share_each_batch_as_one_process(tmp_path):
    memory, shards = _many_shards(tmp_path)
    whole = list(Batcher(memory, batch_size=64, seed=2))
    ranks = [list(Batcher(shards, batch_size=64, seed=2, rank=r, world_size=2)) for r in range(2)]
    for batch, first, second in zip(whole, *ranks, strict=True):
        joined = tuple(torch.cat([a, b]) for a, b in zip(first, second))
        _assert_batches_equal(batch, joined)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_many_shards_batch_size_change_mid_gather_serves_the_new_size(tmp_path, prefetch):
    memory, shards = _many_shards(tmp_path)
    a, b = Batcher(memory, batch_size=32, seed=1), Batcher(shards, batch_size=32, seed=1, prefetch=prefetch)
    served_a, served_b = [], []
    for batcher, served in ((a, served_a), (b, served_b)):
        for index, batch in enumerate(batcher.remaining()):
            served.append(batch)
            if index == 2:  # inside the first joined gather of 16 batches
                batcher.batch_size = 80
    assert [len(batch[1]) for batch in served_b][:5] == [32, 32, 32, 80, 80]
    for batch_a, batch_b in zip(served_a, served_b, strict=True):
        _assert_batches_equal(batch_a, batch_b)


def test_many_shards_state_dict_resumes_inside_a_joined_gather(tmp_path):
    memory, shards = _many_shards(tmp_path)
    expected_batches = list(Batcher(memory, batch_size=32, seed=4))
    first = Batcher(shards, batch_size=32, seed=4)
    served = []
    for batch in first.remaining():
        served.append(batch)
        if len(served) == 5:  # the gather that served it joined batches 1-16
            break
    resumed = Batcher(shards, batch_size=32, seed=4)
    resumed.load_state_dict(first.state_dict())
    served += list(resumed.remaining())
    for batch_a, batch_b in zip(expected_batches, served, strict=True):
        _assert_batches_equal(batch_a, batch_b)


def test_many_shards_joined_gathers_equal_when_maps_are_dropped_all_the_time(tmp_path):
    memory, _ = _many_shards(tmp_path)
    tiny = ShardSource(tmp_path / "s", max_mapped_bytes=1)  # every read is counted, split and dropped
    assert tiny.batches_per_gather(64) > 1
    for batch_a, batch_b in zip(Batcher(memory, batch_size=64, seed=7), Batcher(tiny, batch_size=64, seed=7),
                                strict=True):
        _assert_batches_equal(batch_a, batch_b)


def test_selected_named_shards_are_gathered_several_batches_at_once(tmp_path, monkeypatch):
    from batchfit.data.sources import Selected

    memory, shards = _many_shards(tmp_path, named=True)
    calls = []
    original = shards.gather_batches

    def counted(parts, pin=False):
        calls.append(len(parts))
        return original(parts, pin)

    monkeypatch.setattr(shards, "gather_batches", counted)
    selected = Selected(shards, ("x", "y"))
    plain = ArraySource(memory.tensors[0].numpy(), memory.tensors[1].numpy())
    for batch_a, batch_b in zip(Batcher(plain, 48, seed=2), Batcher(selected, 48, seed=2), strict=True):
        _assert_batches_equal(batch_a, batch_b)
    assert calls and max(calls) > 1  # the joined path, not one gather a batch
