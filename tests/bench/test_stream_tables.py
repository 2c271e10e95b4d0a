"""benchmarks/stream_tables.py: the exact tables and every hashed variant, with their statistics, on a few events."""

import numpy as np

from benchmarks import stream_tables


def test_the_grid_has_the_exact_tables_then_each_scale_and_variant():
    rng = np.random.default_rng(0)
    count = 600
    columns = {"user": rng.integers(0, 943, count), "item": rng.integers(0, 1682, count),
               "rating": rng.integers(1, 6, count).astype(np.float32)}
    rows = stream_tables.tables_grid(columns, scales=(1,), count=count)
    assert [row["scale"] for row in rows] == [None] + [1] * len(stream_tables.VARIANTS)
    exact, hashed, cold = rows[0], rows[1], rows[2]
    assert all(row["events"] == count and 0 < row["preq_rmse"] < 5 for row in rows)
    assert 0 < hashed["item_collision_rate"] < 1 and hashed["item_cold_rate"] == 0
    assert cold["options"] == {"min_count": 2} and cold["item_cold_rate"] > 0  # most items are seen once here
    assert exact["preq_rmse"] != hashed["preq_rmse"]
    text = stream_tables.format_tables(rows)
    assert "| exact tables" in text and "1x buckets, min_count 2 |" in text
