"""Invariant 5 for images: a training epoch over encoded image shards keeps resident memory far
below the dataset's size (measured in a child process; the benchmark runs the same at 1 GiB)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("PIL.Image")


def test_epoch_over_encoded_shards_grows_rss_far_less_than_the_dataset(tmp_path):
    from benchmarks.images import _folder_bytes, peak_rss, write_big_encoded

    source = write_big_encoded(tmp_path / "big", 64)
    dataset = _folder_bytes(source.path)
    measured = peak_rss(source.path, 16, 8 * 2**20)
    assert measured["samples"] == len(source) > 200
    growth = measured["peak_rss"] - measured["start_rss"]
    assert growth < dataset / 3, (growth, dataset, measured)
