"""Worker batches through reused shared buffers (data/worker_slots.py): same batches as in-process, kept
workers across epochs, the ring's turns, and what happens when an epoch is left early."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import batchfit as bf
from batchfit.data.worker_slots import SlotRing
from batchfit.errors import BatchfitError

pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = bf.images.make_image_folder(tmp_path_factory.mktemp("images") / "train", 10, classes=3, sizes=(30, 70))
    shards = bf.images.write_image_shards(root, tmp_path_factory.mktemp("shards") / "enc", workers=0,
                                          progress=False)
    return bf.images.ImageSource(shards, bf.images.train_transform(16))


def batches(batcher, epoch):
    batcher.set_epoch(epoch)
    return list(batcher.remaining())


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (x, y), (x2, y2) in zip(a, b):
        assert x.dtype == x2.dtype == torch.float32 and torch.equal(x, x2) and torch.equal(y, y2)


def test_slot_source_reports_its_buffer_shape(source):
    assert source.slot_shape(8) == (8, 16, 16, 3)
    custom = bf.images.ImageSource(source.src, lambda batch, **kwargs: batch)
    assert custom.slot_shape(8) is None  # not an ImageTransform: gathered whole in the worker


def test_gather_into_and_finish_equal_gather(source):
    indices = np.array([4, 0, 17, 29])
    out = np.full((6, 16, 16, 3), 7, dtype=np.uint8)
    labels = source.gather_into(indices, out, seed=5, epoch=2)
    x, y = source.finish(out[:4], labels)
    x2, y2 = source.gather(indices, seed=5, epoch=2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert (out[4:] == 7).all()  # rows past the batch untouched
    with pytest.raises(BatchfitError, match=r"out.*uint8 array of shape \(4, 16, 16, 3\)"):
        source.gather_into(indices, np.zeros((6, 16, 16, 1), dtype=np.uint8))  # one channel for RGB images


def test_kept_workers_serve_every_epoch_as_in_process(source):
    alone = bf.Batcher(source, batch_size=8, shuffle=True, seed=3)
    workers = bf.Batcher(source, batch_size=8, shuffle=True, seed=3, workers=2)
    first = None
    for epoch in (1, 2, 3):
        assert_same(batches(alone, epoch), batches(workers, epoch))
        first = first or workers._slots
        assert workers._slots is first and not first.broken  # the same worker processes every epoch


def test_resume_at_the_last_partial_batch_keeps_the_workers_for_the_next_epoch(source):
    alone = bf.Batcher(source, batch_size=8, shuffle=True, seed=3)
    workers = bf.Batcher(source, batch_size=8, shuffle=True, seed=3, workers=1)
    state = {**workers.state_dict(), "epoch": 1, "samples_done": 24}  # only the last batch (6) is left
    alone.load_state_dict(state)
    workers.load_state_dict(state)
    assert_same(list(alone.remaining()), list(workers.remaining()))
    kept = workers._slots
    assert kept.shape[0] == 8  # sized for a full batch, not for the 6 samples left
    assert_same(batches(alone, 2), batches(workers, 2))
    assert workers._slots is kept
    workers.close()


def test_epoch_left_early_starts_new_workers_and_loses_nothing(source):
    alone = bf.Batcher(source, batch_size=8, shuffle=True, seed=3)
    workers = bf.Batcher(source, batch_size=8, shuffle=True, seed=3, workers=2)
    workers.set_epoch(1)
    served = workers.remaining()
    head = [next(served) for _ in range(2)]
    served.close()  # batches in flight hold slots
    assert workers._slots.broken
    state = workers.state_dict()
    assert state["samples_done"] == 16
    alone.set_epoch(1)
    assert_same(list(alone.remaining())[:2], head)
    # the rest of the epoch from the state, then a whole epoch, on new workers
    again = bf.Batcher(source, batch_size=8, shuffle=True, seed=3)
    again.load_state_dict(state)
    workers.load_state_dict(state)
    assert_same(list(again.remaining()), list(workers.remaining()))
    assert not workers._slots.broken
    assert_same(batches(alone, 2), batches(workers, 2))


def test_close_stops_the_kept_workers_and_a_trainer_closes_its_batcher(source):
    import multiprocessing

    before = set(multiprocessing.active_children())
    batcher = bf.Batcher(source, batch_size=8, shuffle=True, seed=3, workers=2)
    batches(batcher, 1)
    assert len(set(multiprocessing.active_children()) - before) == 2  # kept for the next epoch
    batcher.close()
    assert set(multiprocessing.active_children()) <= before
    alone = bf.Batcher(source, batch_size=8, shuffle=True, seed=3)
    assert_same(batches(alone, 2), batches(batcher, 2))  # new workers after a close
    batcher.close()

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    trainer = bf.Trainer(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         batch_size=8, workers=2, progress=False)
    trainer.fit(source, epochs=2)
    assert not [child for child in multiprocessing.active_children() if child not in before]


def test_batch_size_change_mid_epoch_matches_in_process(source):
    def run(**options):
        batcher = bf.Batcher(source, batch_size=4, shuffle=True, seed=1, **options)
        out = []
        for batch in batcher.remaining():
            out.append(batch)
            if len(out) == 3:
                batcher.batch_size = 12  # bigger than the buffers the workers have: new ones
        return out

    assert_same(run(), run(workers=2))


def test_two_ranks_with_workers_split_the_batch(source):
    for rank in (0, 1):
        alone = bf.Batcher(source, batch_size=8, shuffle=True, seed=2, rank=rank, world_size=2)
        workers = bf.Batcher(source, batch_size=8, shuffle=True, seed=2, rank=rank, world_size=2, workers=1)
        assert_same(batches(alone, 1), batches(workers, 1))


def test_ring_turns_wait_for_the_slot_and_close_stops_a_waiter():
    ring = SlotRing(2, (3,))
    assert ring.acquire(0).shape == (3,) and ring.acquire(1).shape == (3,)
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire(2)))
    waiter.start()
    time.sleep(0.05)
    assert not got  # slot 0 still holds batch 0
    ring.release(0)
    waiter.join(5)
    assert len(got) == 1
    errors = []

    def wait_for_3():
        try:
            ring.acquire(3)
        except RuntimeError as error:
            errors.append(str(error))

    stuck = threading.Thread(target=wait_for_3)
    stuck.start()
    ring.close()
    stuck.join(5)
    assert errors and "stopped" in errors[0]
