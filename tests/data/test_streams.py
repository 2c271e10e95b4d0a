"""StreamSource: batches by size or time from any iterable, and training on them equals a hand-written loop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf
from batchfit.data.streams import Event


def _events(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 5)).astype(np.float32)
    y = (x @ rng.standard_normal((5, 1))).astype(np.float32)
    return [(x[i], y[i]) for i in range(count)]


def _linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 1)


def _trainer(model: torch.nn.Module, batch_size: int, **options) -> bf.Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return bf.Trainer(model, F.mse_loss, optimizer, batch_size=batch_size, progress=False, **options)


def _reference(events, batch_size: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A hand-written loop over the events in order, a last partial batch included; the losses before each update."""
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for start in range(0, len(events), batch_size):
        chunk = events[start : start + batch_size]
        x = torch.from_numpy(np.stack([e[0] for e in chunk]))
        y = torch.from_numpy(np.stack([e[1] for e in chunk]))
        loss = F.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict(), losses


def test_stream_source_batches_by_size_with_true_last_size():
    source = bf.StreamSource(_events(10))
    sizes, reasons = [], []
    while (batch := source.next_batch(4)) is not None:
        sizes.append(batch.size)
        reasons.append(batch.reason)
        assert batch.batch[0].shape == (batch.size, 5)
    assert sizes == [4, 4, 2] and reasons == ["size", "size", "end"] and source.ended


def test_stream_source_dict_events_give_dict_batches():
    source = bf.StreamSource({"x": float(i), "label": i % 2} for i in range(5))
    batch = source.next_batch(8)
    assert batch is not None and set(batch.batch) == {"x", "label"}
    assert batch.batch["label"].dtype == torch.int64 and batch.batch["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_stream_source_max_latency_cuts_partial_batch_on_time():
    gate = threading.Event()
    events = _events(5)

    def produce():
        yield from events[:3]
        gate.wait(30)  # the producer goes quiet: only the clock can close the batch
        yield from events[3:]

    source = bf.StreamSource(produce(), max_latency=0.05)
    first = None
    for _ in range(1000):
        first = source.next_batch(4, wait=0.02)
        if first is not None:
            break
    gate.set()
    assert first is not None and first.size == 3 and first.reason == "latency"
    rest = [b for b in iter(lambda: source.next_batch(4), None)]
    assert [b.size for b in rest] == [2]
    assert torch.equal(rest[0].batch[0], torch.from_numpy(np.stack([e[0] for e in events[3:]])))


def test_stream_fit_equals_hand_written_loop_and_scores_before_training(assert_close):
    events = _events(23)
    trainer = _trainer(_linear(), batch_size=4)
    history = trainer.fit(bf.StreamSource(events))
    expected, losses = _reference(events, 4)
    assert_close(trainer.module.state_dict(), expected)
    assert history.column("batch_size") == [4] * 5 + [3]
    assert history.losses() == pytest.approx(losses, rel=1e-6)
    sizes = [4] * 5 + [3]
    prequential = sum(loss * n for loss, n in zip(losses, sizes)) / 23  # every event scored before its update
    assert history.column("preq_loss")[-1] == pytest.approx(prequential, rel=1e-6)
    assert history.epochs[-1]["preq_loss"] == pytest.approx(prequential, rel=1e-6)


def test_stream_fit_max_steps_then_resume_equals_uninterrupted(tmp_path, assert_close):
    events = _events(30)
    whole = _trainer(_linear(), batch_size=4)
    whole.fit(bf.StreamSource(events))
    first = _trainer(_linear(), batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    first.fit(bf.StreamSource(events), max_steps=3)
    assert first.step == 3
    second = _trainer(_linear(seed=5), batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    history = second.fit(bf.StreamSource(events), resume=True)  # the same events from their start
    assert second.step == whole.step and second.samples_seen == 30
    assert_close(second.module.state_dict(), whole.module.state_dict())
    assert history.column("preq_loss")[-1] == pytest.approx(whole.history.column("preq_loss")[-1], rel=1e-6)


def test_stream_fit_until_callable_stops():
    trainer = _trainer(_linear(), batch_size=2)
    trainer.fit(bf.StreamSource(_events(20)), until=lambda t: t.samples_seen >= 6)
    assert trainer.step == 3


def test_stream_fit_prequential_user_metric_scored_before_update():
    events = _events(8)
    model = _linear()
    trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                         progress=False, metrics={"mae": lambda out, y: (out - y).abs().mean()})
    reference = _linear()
    x = torch.from_numpy(np.stack([e[0] for e in events[:4]]))
    y = torch.from_numpy(np.stack([e[1] for e in events[:4]]))
    mae_first = float((reference(x) - y).abs().mean().detach())
    history = trainer.fit(bf.StreamSource(events))
    assert history.column("preq_mae")[0] == pytest.approx(mae_first, rel=1e-6)


def test_publish_snapshots_reader_never_sees_a_half_written_snapshot(tmp_path):
    model = torch.nn.Linear(64, 64)
    publisher = bf.PublishSnapshots(tmp_path, every_steps=1, keep=2)
    seen, errors, done = [], [], threading.Event()

    def read():
        while not done.is_set():
            try:
                state, info = bf.load_snapshot(tmp_path)
            except bf.BatchfitError as error:
                if "no snapshot published" not in str(error):
                    errors.append(error)
                continue
            except Exception as error:  # a torn file would fail here
                errors.append(error)
                continue
            # Every weight of snapshot k was set to k: a mix of two snapshots cannot pass.
            if not all(bool((t == info["step"]).all()) for t in state.values()):
                errors.append(f"snapshot {info} holds other weights")
            seen.append(info["step"])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for step in range(1, 121):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(step)
            publisher.publish(model, step, step)
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen and seen == sorted(seen)
    state, info = bf.load_snapshot(tmp_path)
    assert info["step"] == 120 and len(list(tmp_path.glob("snapshot-*.pt"))) == 2


@pytest.mark.parametrize("call, message", [
    (lambda: bf.StreamSource([], max_latency=0), r"`max_latency` must be a positive number of seconds or None"),
    (lambda: bf.StreamSource(5), r"`events` must be an iterable of events or an EventConsumer"),
    (lambda: _trainer(_linear(), batch_size=4).fit((np.zeros((4, 5)), np.zeros((4, 1))), max_steps=3),
     r"`train` must be a bf.streams.StreamSource when max_steps or until is given"),
    (lambda: _trainer(_linear(), batch_size="full").fit(bf.StreamSource([])),
     r"`batch_size` must be a positive integer when training from a stream"),
    (lambda: _trainer(_linear(), batch_size=4).fit(bf.StreamSource([]), until=-1), r"`until` must be None, a"),
    (lambda: _trainer(_linear(), batch_size=4).fit(bf.StreamSource([]), max_steps=0),
     r"`max_steps` must be a positive integer\. Received: max_steps=0"),
    (lambda: bf.PublishSnapshots("snaps"), r"`every_steps` must be a positive integer"),
])
def test_stream_bad_input_is_refused(call, message):
    with pytest.raises(bf.BatchfitError, match=message):
        call()


@pytest.mark.parametrize("resume", [1, 0.0, "yes", None])
def test_stream_fit_resume_must_be_a_bool_as_for_arrays(tmp_path, resume):
    # The same check as fit(arrays, resume=...): a truthy number is not a yes.
    for train in (bf.StreamSource(_events(8)), (np.zeros((8, 5), np.float32), np.zeros((8, 1), np.float32))):
        trainer = _trainer(_linear(), batch_size=4, checkpoint_dir=tmp_path)
        with pytest.raises(ValueError, match=r"`resume` must be False, True or 'force'\. Received: resume="):
            trainer.fit(train, resume=resume)
        assert trainer.step == 0


def test_stream_fit_refuses_on_nan_rollback_instead_of_skipping(tmp_path):
    trainer = _trainer(_linear(), batch_size=4, on_nan="rollback", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"`on_nan` must be 'raise' or 'skip' when training from a stream .*"
                                         r"Received: on_nan='rollback'"):
        trainer.fit(bf.StreamSource(_events(8)))
    assert trainer.step == 0 and not list(tmp_path.glob("step-*.pt"))


class _NaNOnCall:
    """MSE whose ``call``-th call (counting every forward of the trainer) is NaN: a batch that fails as a whole
    although none of its events does on its own, as when the weights diverge."""

    def __init__(self, call: int) -> None:
        self.calls, self.call = 0, call

    def __call__(self, output, target):
        self.calls += 1
        loss = F.mse_loss(output, target)
        return loss * float("nan") if self.calls == self.call else loss


def test_stream_fit_on_nan_skip_quarantines_a_batch_that_fails_as_a_whole_and_counts_it():
    model = _linear()
    trainer = bf.Trainer(model, _NaNOnCall(2), torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                         progress=False, on_nan="skip")
    source = bf.StreamSource(_events(12))
    history = trainer.fit(source)
    assert trainer.step == 2 and trainer.skipped_steps == 1 and trainer.samples_seen == 8
    assert history.epochs[-1]["skipped_steps"] == 1 and history.epochs[-1]["dead_letters"] == 4
    # Not dropped: the four events of step 2 are in the dead letters, with the reason.
    assert [letter.id for letter in source.dead_letters] == [4, 5, 6, 7]
    assert "though no event's is on its own" in source.dead_letters[0].reason
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())


def test_stream_fit_on_nan_raise_names_the_step_and_the_fit():
    model = _linear()
    trainer = bf.Trainer(model, _NaNOnCall(2), torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                         progress=False)
    source = bf.StreamSource(_events(12))
    with pytest.raises(bf.BatchfitError, match=r"the loss of step 2 \(epoch 1\) is nan"):
        trainer.fit(source)
    assert trainer.step == 1 and not source.dead_letters


def test_stream_save_checkpoint_from_a_callback_writes_a_stream_checkpoint(tmp_path):
    # One save_checkpoint for data sets and streams: the stream's part (consumer state, the events the
    # checkpoint includes) is in it, and a data set run refuses to resume it.
    class Save(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 2:
                trainer.save_checkpoint()

    trainer = _trainer(_linear(), batch_size=4, checkpoint_dir=tmp_path, callbacks=[Save()])
    trainer.fit(bf.StreamSource(_events(12)))
    state = torch.load(tmp_path / "step-000000002.pt", weights_only=True)
    assert state["kind"] == "stream" and state["step"] == 2 and state["samples_seen"] == 8
    assert len(state["stream"]["ranks"]) == 1 and len(state["stream"]["ranks"][0]["included"]) == 8
    other = _trainer(_linear(), batch_size=4, checkpoint_dir=tmp_path)
    with pytest.raises(bf.CheckpointError, match=r"written by training on a stream, not on a data set"):
        other.fit((np.zeros((8, 5), np.float32), np.zeros((8, 1), np.float32)), resume=True)


def test_stream_fit_stateful_metric_accumulates_over_the_stream():
    class MaxError:
        """A stateful metric (update/compute/reset): the largest absolute error so far."""

        def __init__(self):
            self.worst = 0.0

        def update(self, output, target):
            self.worst = max(self.worst, float((output - target).abs().max()))

        def compute(self):
            return self.worst

        def reset(self):
            self.worst = 0.0

    model = _linear()
    metric = MaxError()
    trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                         progress=False, metrics={"max_error": metric})
    history = trainer.fit(bf.StreamSource(_events(12)))
    values = history.column("preq_max_error")
    assert values == sorted(values) and values[-1] == metric.worst > 0


def test_stream_fit_steps_a_torch_scheduler_per_step_like_a_hand_written_loop(assert_close):
    events = _events(23)
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    trainer = bf.Trainer(model, F.mse_loss, optimizer, lr_schedule=scheduler, batch_size=4, progress=False)
    history = trainer.fit(bf.StreamSource(events))
    reference = _linear()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_optimizer, step_size=2, gamma=0.5)
    lrs = []
    for start in range(0, 23, 4):
        x = torch.from_numpy(np.stack([e[0] for e in events[start : start + 4]]))
        y = torch.from_numpy(np.stack([e[1] for e in events[start : start + 4]]))
        lrs.append(ref_optimizer.param_groups[0]["lr"])
        ref_optimizer.zero_grad()
        F.mse_loss(reference(x), y).backward()
        ref_optimizer.step()
        ref_scheduler.step()
    assert history.column("lr") == pytest.approx(lrs) and lrs[-1] < lrs[0]
    assert_close(trainer.module.state_dict(), reference.state_dict())


def test_stream_fit_is_one_epoch_for_callbacks_and_plateau_schedulers():
    calls = []

    class Hooks(bf.Callback):
        def on_epoch_begin(self, trainer, epoch):
            calls.append(("begin", epoch, trainer.step))

        def on_epoch_end(self, trainer, epoch, record):
            calls.append(("end", epoch, record["steps"], round(record["loss"], 9)))

    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    trainer = bf.Trainer(model, F.mse_loss, optimizer, lr_schedule=plateau, batch_size=4, progress=False,
                         callbacks=[Hooks()])
    events = _events(40)
    first = trainer.fit(bf.StreamSource(events[:20]))
    trainer.fit(bf.StreamSource(events[20:]))
    assert [c[:3] for c in calls] == [("begin", 1, 0), ("end", 1, 5), ("begin", 2, 5), ("end", 2, 10)]
    assert calls[1][3] == round(first.epochs[0]["loss"], 9) and [r["epoch"] for r in first.epochs] == [1, 2]
    assert {r["epoch"] for r in first.steps} == {1, 2}
    # The plateau scheduler saw each fit's prequential loss: it halves the lr when a fit's loss did not improve.
    improved = first.epochs[1]["loss"] < first.epochs[0]["loss"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 if improved else 0.025)


def test_stream_fit_progress_shows_events_per_second(capsys):
    model = _linear()
    trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.01), batch_size=4, progress=True)
    trainer.fit(bf.StreamSource(_events(12)))
    err = capsys.readouterr().err
    assert "samples/s" in err and "epoch 1/1: loss" in err


def test_stream_history_plot_shows_the_prequential_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    from batchfit.train.stream_plots import is_stream_history, plot_stream_history

    model = _linear()
    trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), batch_size=4,
                         progress=False, metrics={"mae": lambda out, y: (out - y).abs().mean()})
    history = trainer.fit(bf.StreamSource(_events(40)))
    assert is_stream_history(history) and "preq_mae_window" in history.columns()
    history.plot(tmp_path / "curves.png")
    plot_stream_history(history, tmp_path / "with_reference.png", reference={"offline": 0.5})
    for name in ("curves.png", "with_reference.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_list_is_read_ahead_as_columns_and_batches_span_reads():
    """A list is read in chunks (here 3 events) admitted as columns; a batch of 4 joins two reads, in order, with
    the ids, the dtypes one collate would give, and floating fields cast to ``float_dtype`` once per read."""
    events = [(i, float(i) / 2) for i in range(10)]
    source = bf.StreamSource(events)
    source.read_ahead = 3
    source.float_dtype = torch.float32
    batches = list(iter(lambda: source.next_batch(4), None))
    assert [list(b.ids) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.reason for b in batches] == ["size", "size", "end"]
    assert batches[0].batch[0].dtype == torch.int64 and batches[0].batch[1].dtype == torch.float32
    assert torch.cat([b.batch[0] for b in batches]).tolist() == list(range(10))
    assert torch.cat([b.batch[1] for b in batches]).tolist() == [i / 2 for i in range(10)]
    assert batches[1].event(2).sample == (6, 3.0) and batches[1].event(2).id == 6 and not batches[1].events


def test_a_poison_event_inside_a_read_is_quarantined_and_the_rest_trained_in_order():
    events = [(i, 1.0) for i in range(6)] + [(6, float("nan"))] + [(i, 1.0) for i in range(7, 12)]
    source = bf.StreamSource(events)
    batches = list(iter(lambda: source.next_batch(4), None))
    assert [list(b.ids) for b in batches] == [[0, 1, 2, 3], [4, 5, 7, 8], [9, 10, 11]]
    assert [d.id for d in source.dead_letters] == [6]
    # Quarantined event 6 is acknowledged with the first batch cut after every event read before it was.
    assert [b.quarantined for b in batches] == [[], [6], []]


def test_a_resumed_list_skips_what_the_checkpoint_used():
    source = bf.StreamSource([(i, 0.5) for i in range(20)])
    assert list(source.next_batch(8).ids) == list(range(8))
    source.load_state_dict({"used": 5, "included": [5, 6]})
    assert list(source.next_batch(8).ids) == list(range(7, 15))


def test_a_trainer_behind_the_stream_doubles_its_batch_up_to_max_batch_size_then_returns():
    """Events produced long ago (a backlog: their times are set 10 s back) make the batch grow 4 -> 8 -> 16 -> 16;
    once the backlog is drained and new events are fresh, it halves back to batch_size (16 -> 8 -> 4)."""
    class Backlog:
        def __init__(self) -> None:
            one = np.ones(1, np.float32)
            self.events = [Event(i, (np.array([i % 5], np.float32), one), time.time() - 10.0) for i in range(44)]
            self.fresh = 0

        def poll(self, max_events, timeout):
            if self.events:
                taken, self.events = self.events[:max_events], self.events[max_events:]
                return taken
            if self.fresh >= 12:
                return None
            self.fresh += 4
            one = np.ones(1, np.float32)
            return [Event(100 + self.fresh + i, (one, one), time.time()) for i in range(4)]

        def ack(self, ids): pass
        def state_dict(self): return {}
        def load_state_dict(self, state): pass
        def close(self): pass

    with pytest.raises(ValueError, match="max_batch_size"):
        bf.StreamSource([(1.0, 1.0)], max_batch_size=8)
    source = bf.StreamSource(Backlog(), max_latency=0.5, max_batch_size=16)
    source.read_ahead = 64
    model = torch.nn.Linear(1, 1)
    trainer = bf.Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.01), batch_size=4,
                         progress=False)
    history = trainer.fit(source)
    assert history.column("batch_size") == [4, 8, 16, 16, 8, 4]
    assert trainer.samples_seen == 56


def test_production_rates_are_the_events_between_oldest_events_over_their_production_times():
    from batchfit.train.stream_plots import production_rates

    # Steps of 10 events produced at 1,000 events/s (the oldest of step i at 0.01 * i), trained later and later.
    seconds = [0.5 + 0.02 * i for i in range(6)]
    lags = [s - 0.01 * i for i, s in enumerate(seconds)]
    assert production_rates([10] * 6, seconds, lags, window=2) == pytest.approx([1000.0] * 5)
    # A producer that doubles its rate after step 3.
    produced = [0.0, 0.01, 0.02, 0.03, 0.035, 0.04]
    lags = [s - p for s, p in zip(seconds, produced)]
    assert production_rates([10] * 6, seconds, lags, window=1) == pytest.approx([1000, 1000, 1000, 2000, 2000])
