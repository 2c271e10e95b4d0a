"""The text benchmark's batching rows on a tiny corpus: every mode trains on every token once, and
sorting or grouping by length pads less than random batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Words:
    """Word ids 3.. by first appearance; 0 pads, 1 ends a sequence."""

    eos_token_id, pad_token_id, name_or_path = 1, 0, "words"

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str], add_special_tokens: bool = True, **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[self.vocab.setdefault(w, len(self.vocab) + 3) % 60 + 3 for w in t.split()]
                              for t in texts]}


def test_text_bench_batching_rows_count_every_token_once(tmp_path: Path) -> None:
    import numpy as np

    from batchfit.data.text import write_text_shards
    from benchmarks.text import batching_rows

    rng = np.random.default_rng(0)
    lines = ["text,label"] + [" ".join(f"w{i}" for i in rng.integers(0, 90, size=int(n))) + f",{n % 2}"
                              for n in rng.integers(3, 120, size=96)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    source = write_text_shards(tmp_path / "t.csv", tmp_path / "s", Words(), label_column="label")
    lengths = source.lengths()
    assert lengths is not None
    rows = batching_rows(source, repeats=1, pad_token_id=0, vocab_size=64)
    assert len(rows) == 5
    for row in rows:
        assert row["tokens"] == int(lengths.sum()), row["mode"]  # each sample once an epoch, padding not counted
        assert 0.0 <= row["padding"] < 1.0
    padding = {row["mode"].split(":")[0].split(" (")[0]: row["padding"] for row in rows}
    assert padding["length-grouped + sorted micro-batches"] < padding["naive"]
    assert padding["sorted micro-batches in the batch"] < padding["naive"]
