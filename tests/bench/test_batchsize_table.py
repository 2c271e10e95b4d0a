"""The batch-size benchmark's table: every trial's choice is shown, ratios and misses are labelled."""

from __future__ import annotations

from benchmarks.batchsize import format_batch_size_table


def _row(batch_size, seconds, chosen_per_trial, ratio=None, lr=0.01):
    return {"workload": "w", "batch_size": batch_size, "lr": lr, "steps": 10 if seconds else None,
            "seconds": seconds, "diverged": False, "chosen": chosen_per_trial[0],
            "chosen_per_trial": chosen_per_trial, "ratio_to_best_fixed": ratio}


def test_table_shows_each_trials_choice_when_they_differ():
    rows = [_row(64, 1.0, [[64]], 1.0),
            {**_row("auto", 1.3, [[64], [128], [64]], 1.3), "probe_seconds": 0.05, "ratio_without_probe": 1.25},
            _row("adaptive", 0.5, [[64, 128], [64, 128]], 0.5),
            _row(256, None, [[256]])]
    table = format_batch_size_table(rows).splitlines()
    assert "| auto (64×2, 128) |" in table[3] and "| 1.30 (0.05) | 1.30 (1.25) |" in table[3]
    assert "| adaptive (64→128) |" in table[4]
    assert "not reached" in table[5] and table[5].endswith("| — |")
    assert table[2].endswith("| 1.00 |")
