"""Training from streams of events: sources, Redis, dead letters, snapshots for serving, hashed tables.

Reached as ``bf.streams``::

    import batchfit as bf

    events = bf.streams.RedisStream("redis://127.0.0.1:6379/0", "ratings", group="trainers")
    source = bf.streams.StreamSource(events, max_latency=0.05)
    trainer = bf.Trainer(model, loss_fn, optimizer, batch_size=256, checkpoint_dir="ckpt",
                         callbacks=[bf.streams.PublishSnapshots("serving", every_steps=1000)])
    trainer.fit(source)

The names ``bf.StreamSource``, ``bf.RedisStream``, ``bf.EventConsumer``, ``bf.DeadLetter``,
``bf.PublishSnapshots`` and ``bf.load_snapshot`` still work.
"""

from .data.redis_streams import RedisStream
from .data.streams import DeadLetter, EventConsumer, StreamSource
from .train.callbacks.snapshots import PublishSnapshots, load_snapshot
from .workloads.stream import EventMSE, HashedEmbedding, MatrixFactorization, Recipe, SequentialMSE, per_event

__all__ = ["DeadLetter", "EventConsumer", "EventMSE", "HashedEmbedding", "MatrixFactorization", "PublishSnapshots",
           "Recipe", "RedisStream", "SequentialMSE", "StreamSource", "load_snapshot", "per_event"]
