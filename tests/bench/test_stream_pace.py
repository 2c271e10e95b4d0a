"""benchmarks/stream_pace.py: the stream loop against the hand loop, and the river row skipped without river."""

import sys

import numpy as np

from benchmarks import stream_pace


def _columns(count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"user": rng.integers(0, 943, count), "item": rng.integers(0, 1682, count),
            "rating": rng.integers(1, 6, count).astype(np.float32)}


def test_pace_rows_hold_both_loops_and_their_ratio():
    rows = stream_pace.pace_table(_columns(256), batch_sizes=(32,), events=256, repeats=1)
    [row] = rows
    assert row["batch_size"] == 32 and row["events"] == 256 and row["repeats"] == 1
    assert row["stream_per_s"] > 0 and row["hand_per_s"] > 0
    assert abs(row["ratio"] - row["stream_per_s"] / row["hand_per_s"]) < 1e-9  # one repeat: the ratio of the two
    assert "| 32 | 256 |" in stream_pace.format_pace_table(rows)


def test_without_river_the_river_row_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "river", None)  # import river raises ImportError
    result = stream_pace.river_table(_columns(64), repeats=1, count=64)
    assert result["river"] is None and result["recipe"]["events"] == 64
    assert result["recipe"]["preq_rmse"] > 0
    text = stream_pace.format_river_table(result)
    assert "skipped: river is not installed" in text and "| 1.00 |" not in text
    assert len(result["recipes"]) == len(stream_pace.RIVER_RECIPES) and "sequential scoring" in text
