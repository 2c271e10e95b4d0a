"""benchmarks/stream_soak.py with tiny numbers: a trainer subprocess killed once while events arrive, the lineage
rebuilt from its log exact; and the log reader, the memory table and the flatness check on hand-made input."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import stream_soak


@pytest.mark.slow
def test_a_killed_and_resumed_trainer_trains_every_event_once(redis_server, tmp_path):
    settings = stream_soak.Settings(checkpoint_seconds=0.3, idle_timeout=2.0, users=1 << 12, items=1 << 10)
    result = stream_soak.soak(redis_server, tmp_path, events=3000, rate=400.0, kill_every=(1.0, 2.0), max_kills=1,
                              settings=settings, timeout=240.0)
    lineage = result["lineage"]
    assert result["kills"] == 1 and result["incarnations"] == 2 and result["last_exit"] == 0
    assert lineage["produced"] == lineage["distinct_produced"] == 3000
    assert lineage["lost"] == 0 and lineage["twice"] == 0 and lineage["unknown"] == 0 and lineage["pending"] == 0
    assert lineage["in_lineage"] == 3000 and lineage["steps_contiguous"] and lineage["exact"]
    assert result["memory"] and all(rss > 0 for _, rss, _, _, _ in result["memory"])
    text = stream_soak.format_report({"soak": result, "lag": [],
                                      "memory_table": stream_soak.memory_table(result["memory"], 3000, per=1000),
                                      "flatness": stream_soak.flatness(result["memory"], 3000, 0.1),
                                      "incarnations": stream_soak.incarnation_table(result["memory"])})
    assert "Lineage: EXACT" in text


def test_the_log_reader_drops_the_steps_a_resume_undid(tmp_path: Path):
    log = tmp_path / "log"
    log.write_text("resume 0 0\nstep 1 10.0 a b\nstep 2 11.0 c\nmem 3 100 50 11.5\nstep 3 12.0 d\n"
                   "resume 1 2\nstep 2 20.0 c d\nmem 4 120 60 20.5\ndone\n")
    read = stream_soak.read_log(log)
    assert read.lineage == {1: (10.0, ["a", "b"]), 2: (20.0, ["c", "d"])} and read.done
    assert read.logged_steps == 4 and read.resumes == [(0, 0), (1, 2)]
    assert read.memory == [(3, 100, 50, 11.5, 1), (4, 120, 60, 20.5, 2)]
    check = stream_soak.check_lineage(read, ["a", "b", "c", "d"])
    assert check["exact"] and check["retrained_events"] == 2
    assert not stream_soak.check_lineage(read, ["a", "b", "c", "d", "e"])["exact"]  # "e" lost
    doubled = stream_soak.read_log(log)
    doubled.lineage[3] = (30.0, ["a"])
    assert stream_soak.check_lineage(doubled, ["a", "b", "c", "d"])["twice"] == 1


def test_flatness_compares_the_last_quarter_with_the_second():
    memory = [(s, 100 + (50 if s > 75 else 0), 10, 0.0, 1) for s in range(1, 101)]
    flat = stream_soak.flatness(memory, 100, 0.1)
    assert flat["checkpoint"]["flat"] and flat["checkpoint"]["ratio"] == 1.0
    assert not flat["rss"]["flat"] and flat["rss"]["ratio"] == 1.5
    rows = stream_soak.memory_table(memory, 100, per=25)
    assert [r["rss_median"] for r in rows] == [100, 100, 100, 150]
