"""Shard writing under faults: concurrent writers, a crash between the renames of an overwrite,
bad arguments refused before any data is written."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from batchfit import BatchfitError, ShardSource, write_shards
from batchfit.data.shards import MANIFEST


def arrays(n: int, value: float = 1.0):
    return np.full((n, 3), value, np.float32), np.arange(n, dtype=np.int64)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_two_writers_without_overwrite_cannot_both_succeed(tmp_path):
    target = tmp_path / "s"

    def batches():
        yield arrays(10, 1.0)
        # Another writer creates the folder while this one is still writing.
        write_shards(target, arrays(5, 2.0))
        yield arrays(10, 1.0)

    with pytest.raises(BatchfitError, match="which another writer created while this one wrote"):
        write_shards(target, batches())
    kept = ShardSource(target)
    assert len(kept) == 5 and float(kept.gather(np.arange(5))[0][0, 0]) == 2.0  # the first one to finish
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.mark.parametrize("overwrite", ["no", 1, None])
def test_write_shards_overwrite_must_be_a_bool(tmp_path, overwrite):
    write_shards(tmp_path / "s", arrays(4))
    with pytest.raises(BatchfitError, match=rf"`overwrite` must be True or False. Received: overwrite={overwrite!r}"):
        write_shards(tmp_path / "s", arrays(4, 2.0), overwrite=overwrite)
    assert float(ShardSource(tmp_path / "s").gather(np.arange(1))[0][0, 0]) == 1.0


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path):
    with pytest.raises(BatchfitError, match="`metadata` must be a JSON-able mapping"):
        write_shards(tmp_path / "s", arrays(4), metadata={"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_crash_between_the_renames_of_an_overwrite_keeps_the_old_copy(tmp_path):
    target = tmp_path / "s"
    write_shards(target, arrays(6, 1.0))
    pid = dead_pid()
    # What a writer killed between its two renames leaves: the old folder moved aside, the new one complete.
    os.rename(target, tmp_path / f".s.old-{pid}-abcd1234")
    write_shards(tmp_path / "new", arrays(3, 9.0))
    os.rename(tmp_path / "new", tmp_path / f".s.partial-{pid}-ef567890")
    with pytest.raises(BatchfitError, match="a folder that does not exist yet"):
        write_shards(target, arrays(2, 5.0))  # the old copy is back, so this is refused
    restored = ShardSource(target, verify="full")
    assert len(restored) == 6 and float(restored.gather(np.arange(1))[0][0, 0]) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_overwrite_replaces_in_one_step_and_leaves_no_hidden_copy(tmp_path):
    target = tmp_path / "s"
    write_shards(target, arrays(6, 1.0))
    replaced = write_shards(target, arrays(3, 4.0), overwrite=True)
    assert len(replaced) == 3 and (target / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_pad_value_that_does_not_fit_a_ragged_array_is_refused_and_nothing_is_left(tmp_path):
    ragged = [np.arange(3, dtype=np.int8), np.arange(5, dtype=np.int8)]
    with pytest.raises(BatchfitError, match=r"`pad_value` must be a value that fits int8 .*Received: pad_value=300"):
        write_shards(tmp_path / "s", (ragged, np.zeros(2)), pad_value=300)
    assert list(tmp_path.iterdir()) == []


def test_shard_source_on_a_file_says_it_is_a_file(tmp_path):
    from batchfit import ShardError

    (tmp_path / "x.npy").write_bytes(b"not a folder")
    with pytest.raises(ShardError, match=r"x\.npy is a file, not a shard folder"):
        ShardSource(tmp_path / "x.npy")


def test_shard_source_exposes_class_names(tmp_path):
    source = write_shards(tmp_path / "s", arrays(4), metadata={"classes": ["cat", "dog"]})
    assert source.classes == ["cat", "dog"]
    assert write_shards(tmp_path / "t", arrays(4)).classes is None


def test_batcher_refuses_a_position_outside_the_epoch(tmp_path):
    from batchfit import Batcher

    batcher = Batcher(ShardSource(write_shards(tmp_path / "s", arrays(10)).path), batch_size=4)
    state = batcher.state_dict()
    for bad in (-1, 11, 2.5):
        with pytest.raises(BatchfitError, match=r"`state\['samples_done'\]` must be a position from 0 to 10"):
            batcher.load_state_dict({**state, "samples_done": bad})


def test_batcher_names_a_shard_cut_short_at_the_next_epoch(tmp_path):
    from batchfit import Batcher, ShardError

    source = write_shards(tmp_path / "s", arrays(64), shard_size=16)
    batcher = Batcher(source, batch_size=16, shuffle=False)
    next(iter(batcher))  # maps the first shard
    victim = sorted((tmp_path / "s").glob("*.npy"))[0]
    os.truncate(victim, 64)
    with pytest.raises(ShardError, match=victim.name):
        batcher.set_epoch(1)
