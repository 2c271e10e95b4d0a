"""max_batch_size="auto": the catch-up batch is capped by the noise scale measured on the stream itself."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.data.streams import Event

D, SIGMA, BATCH = 4, 4.0, 16
TRUE_W = np.full(D, 0.5, np.float32)  # |w*|² = 1


def analytic_b_simple() -> float:
    """Linear regression, x ~ N(0, I_d), y = w*·x + σε, F.mse_loss, weights at 0 (Δ = -w*): the per-event gradient
    is 2(Δ·x − σε)x, so |G|² = 4|Δ|² and tr(Σ) = 4(d+1)|Δ|² + 4σ²d; B_simple = d + 1 + σ²d/|Δ|²."""
    delta_sq = float(TRUE_W @ TRUE_W)
    return D + 1 + SIGMA**2 * D / delta_sq


def _samples(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, D)).astype(np.float32)
    y = (x @ TRUE_W + SIGMA * rng.standard_normal(count)).astype(np.float32)[:, None]
    return [(x[i], y[i]) for i in range(count)]


def _trainer(lr: float = 0.0, folder=None, callbacks=()) -> bf.Trainer:
    model = torch.nn.Linear(D, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    return bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=lr), batch_size=BATCH, progress=False,
                      checkpoint_dir=folder, checkpoint_every=10 if folder else None, callbacks=list(callbacks))


def test_auto_cap_lands_near_the_analytic_noise_scale():
    expected = analytic_b_simple()  # 69
    trainer = _trainer()  # lr 0: the weights stay where B_simple is known
    history = trainer.fit(bf.StreamSource(_samples(48_000), max_latency=60.0, max_batch_size="auto"))
    noise, low, caps = history.column("noise_scale"), history.column("noise_scale_low"), history.column("batch_cap")
    # Measured: 60.9 (other draws of the data: 28 to 1,064, docs/streams.md; the estimate is noisy at 8 x the batch).
    assert expected / 2 <= noise[-1] <= expected * 2, (noise[-1], expected)
    assert low[-1] < noise[-1]  # the lower confidence bound the cap follows: 37.4 here
    # batch_size times a power of two, at or under the bound: 32 for a bound in [32, 64).
    assert caps[-1] == BATCH * 2 ** int(np.log2(low[-1] / BATCH))
    assert expected / 4 <= caps[-1] <= expected * 2
    assert caps[0] == BATCH and set(history.column("batch_size")) == {BATCH}  # never behind: the batch stays put


def test_auto_cap_is_steady_across_draws_of_the_same_stream():
    """Eight draws of the analytic setup: the ratio of the averages alone gave caps of 16 to 1,024 (one draw's
    averaged |G|² was near zero, its noise scale 1,064); the lower confidence bound keeps them within a factor
    of 4 of each other and under twice the true noise scale, and the cap never more than doubles at once."""
    expected = analytic_b_simple()  # 69
    caps = []
    for seed in range(8):
        history = _trainer().fit(bf.StreamSource(_samples(48_000, seed), max_latency=60.0, max_batch_size="auto"))
        column = history.column("batch_cap")
        assert all(after <= 2 * before for before, after in zip(column, column[1:]))
        caps.append(column[-1])
    # Measured: 32, 32, 16, 32, 16, 32, 64, 16 (the ratio of the averages alone: 32, 64, 16, 64, 32, 64, 1,024, 32).
    assert max(caps) / min(caps) <= 4, caps
    assert all(BATCH <= cap <= 2 * expected for cap in caps), caps


class Backlog:
    """Events produced 10 s ago: a trainer with max_latency 0.5 is behind at every step."""

    def __init__(self, count: int) -> None:
        samples = _samples(count)
        self.events = [Event(i, s, time.time() - 10.0) for i, s in enumerate(samples)]

    def poll(self, max_events, timeout):
        if not self.events:
            return None
        taken, self.events = self.events[:max_events], self.events[max_events:]
        return taken

    def ack(self, ids): pass
    def state_dict(self): return {}
    def load_state_dict(self, state): pass
    def close(self): pass


def test_a_trainer_behind_grows_its_batch_up_to_the_auto_cap_only():
    source = bf.StreamSource(Backlog(16_000), max_latency=0.5, max_batch_size="auto")
    source.read_ahead = 1024
    history = _trainer().fit(source)
    sizes, caps = history.column("batch_size"), history.column("batch_cap")
    assert sizes[:193] == [BATCH] * 193  # fewer than 25 measurements (steps 0, 8, ..., 192): the cap is batch_size
    assert all(size <= cap for size, cap in zip(sizes[1:], caps[:-1]))  # each batch within the cap before it
    assert BATCH < max(sizes) <= max(caps)  # grew once measured, never past the cap


@pytest.mark.parametrize("crash_at", [301, 451])  # the cap is 16 up to step 424, then 32
def test_auto_cap_resumes_exactly(tmp_path, crash_at):
    samples = _samples(8000)

    class Crash(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == crash_at:
                raise RuntimeError("crash")

    def source():
        return bf.StreamSource(samples, max_latency=60.0, max_batch_size="auto")

    with pytest.raises(RuntimeError, match="crash"):
        _trainer(0.01, tmp_path / "ckpt", [Crash()]).fit(source())
    resumed = _trainer(0.01, tmp_path / "ckpt")
    history = resumed.fit(source(), resume=True)
    whole = _trainer(0.01)
    reference = whole.fit(source())
    assert resumed.step == whole.step == 500
    assert torch.equal(resumed.module.weight, whole.module.weight)
    assert history.column("noise_scale")[-1] == reference.column("noise_scale")[-1]
    assert history.column("batch_cap") == reference.column("batch_cap")  # each step's, after the resume too
    assert history.column("batch_cap")[-1] == 32
    assert reference.column("noise_scale")[-1] > 0  # measured: the averages are in the checkpoint
    assert torch.load(sorted((tmp_path / "ckpt").glob("step-*.pt"))[-1], weights_only=True)["stream"]["noise"]["cap"] \
        == history.column("batch_cap")[-1]  # the cap too (a checkpoint at step 500, the end)


def test_max_batch_size_is_checked():
    with pytest.raises(ValueError, match='a positive integer, "auto" or None'):
        bf.StreamSource([(1.0, 1.0)], max_latency=0.1, max_batch_size="big")
    with pytest.raises(ValueError, match="max_batch_size"):
        bf.StreamSource([(1.0, 1.0)], max_batch_size="auto")  # needs a max_latency
    assert bf.StreamSource([(1.0, 1.0)], max_latency=0.1, max_batch_size=64).max_batch_size == 64
