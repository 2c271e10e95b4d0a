"""History: the checkpointed form is compact and restores every record exactly."""

from __future__ import annotations

import io
import math

import torch

import batchfit as bf


def _saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_history_state_dict_packs_numeric_columns_and_round_trips_exactly():
    history = bf.History()
    for step in range(1, 2001):
        loss = math.nan if step == 7 else 1.0 / step + 1e-17 * step
        history.add_step(step, step // 100, 32 * step, 32, loss, 0.1 * step, step / 3, noise_scale=float(step) ** 0.5)
    history.add_event(step=5, kind="batch_size", batch_size=64, reason="test")
    state = history.state_dict()
    assert isinstance(state["columns"]["step"], torch.Tensor) and state["columns"]["step"].dtype == torch.int64
    assert state["columns"]["loss"].dtype == torch.float64

    restored = bf.History()
    restored.load_state_dict(_saved_and_loaded(state))
    before, after = history.steps, restored.steps
    assert len(after) == 2000
    for old, new in zip(before, after):
        assert old.keys() == new.keys()
        for key in old:
            assert type(new[key]) is type(old[key]), key
            assert new[key] == old[key] or (math.isnan(old[key]) and math.isnan(new[key])), key
    assert restored.events == history.events


def test_history_loads_a_state_saved_as_plain_lists():
    history = bf.History()
    history.load_state_dict({"columns": {"step": [1, 2], "epoch": [0, 0], "samples": [4, 8], "batch_size": [4, 4],
                                         "loss": [0.5, 0.25], "lr": [0.1, 0.1], "seconds": [0.1, 0.2]},
                             "epochs": [], "events": []})
    assert history.losses() == [0.5, 0.25]
    assert [r["step"] for r in history.steps] == [1, 2]
