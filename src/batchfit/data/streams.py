"""Streams of events cut into mini-batches by size or by time.

An event is one sample: a tuple of numbers/arrays (``(inputs..., target)``) or a dict of them.
:class:`StreamSource` reads events from a *consumer* — anything with the :class:`EventConsumer`
methods (``poll``, ``ack``, ``state_dict``, ``load_state_dict``, ``close``): a plain iterable is
wrapped in :class:`IterableEvents`; :class:`~batchfit.data.redis_streams.RedisStream` reads a
Redis stream in a consumer group; a Kafka or NATS consumer plugs in the same way.

A batch closes when it holds ``batch_size`` events or ``max_latency`` seconds after its first
event arrived, whichever comes first; a batch cut on time keeps its true size, so its loss is the
exact mean over the events it holds.

An event that cannot be trained on — one its consumer could not parse (``Event.error``), one whose
fields differ from the stream's, a value that is not a number, an integer beyond int64, a NaN or
infinite number, or a value outside ``ranges`` — is *quarantined* as it arrives: it never takes a
place in a batch, is handed to the consumer's ``quarantine`` (a :class:`~batchfit.RedisStream`
writes it to its dead-letter stream), to ``on_dead_letter`` and to :attr:`StreamSource.dead_letters`,
and is acknowledged with the batch that follows it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..core.batch import Batch
from ..errors import BatchfitError, InputError, expected

logger = logging.getLogger("batchfit")

# How long one wait for events lasts at most, so that the loop can look at signals and budgets.
TICK_SECONDS = 0.1
# Events asked of a consumer at once (at least a batch): a broker answers many small batches in one round trip.
READ_AHEAD = 512
# Quarantined events a StreamSource keeps in memory (dead_letters), and how many are logged one by one.
DEAD_LETTERS_KEPT = 1000
LOGGED_DEAD_LETTERS = 20
INT64 = (-(2**63), 2**63)


@dataclass(frozen=True)
class Event:
    """One event: its ``id`` (what :meth:`EventConsumer.ack` takes), the ``sample``, and ``time``.

    ``time`` is when the event was produced, in seconds since the epoch (for Redis: the time in its
    stream id, set by the server at ``XADD``), or when it was read where the producer set none.
    """

    id: Any
    sample: Any
    time: float
    redelivered: bool = False  # delivered before (left pending by a crash, or claimed from a dead consumer)
    error: str | None = None  # why the consumer could not read a sample from it (a poison event), else None
    raw: Any = None  # what the broker delivered, for the dead-letter stream (a Redis entry's fields)


@dataclass(frozen=True)
class DeadLetter:
    """An event taken out of training: its ``id``, the ``reason`` in words, the ``sample`` as read (``None`` when
    it could not be parsed) and the ``raw`` fields the broker delivered (``None`` for a plain iterable)."""

    id: Any
    reason: str
    sample: Any = None
    raw: Any = None


@dataclass
class Chunk:
    """Events read together, without an :class:`Event` each: their ``samples``, ``ids`` and production ``times``
    (one number for all when they were read at once). What :meth:`IterableEvents.poll_chunk` returns."""

    samples: list[Any]
    ids: Sequence[Any]
    times: list[float] | float


@dataclass
class Segment:
    """Buffered events admitted together, as columns: ``batch`` holds them collated once (each batch cut from it is
    a view), ``ids`` and ``times`` theirs (``times`` one number for all), ``numbers`` their order of arrival (the
    first's number when consecutive), ``arrived`` when they were received (``time.monotonic()``), ``events`` the
    :class:`Event` objects when the consumer gave some (a broker's: for the dead letters' raw fields), and
    ``redelivered`` which of them had been delivered before (``None``: none). ``start`` events are cut already."""

    batch: Batch
    ids: Sequence[Any]
    times: list[float] | float
    numbers: list[int] | int
    arrived: float
    events: list[Event] | None = None
    redelivered: list[bool] | None = None
    start: int = 0

    @property
    def left(self) -> int:
        return len(self.ids) - self.start

    def first_number(self) -> int:
        """The arrival number of the first event not cut yet."""
        return self.numbers + self.start if isinstance(self.numbers, int) else self.numbers[self.start]

    def take(self, count: int) -> tuple[Batch, Sequence[Any], list[float], list[Event] | None, int, float]:
        """The next ``count`` events (at most what is left): their batch (views), ids (a ``range`` for numbered
        events), times, events, how many were redelivered, and the oldest time."""
        a = self.start
        b = self.start = min(a + count, len(self.ids))
        batch, times = self.batch, self.times
        part = tuple([v[a:b] for v in batch]) if type(batch) is tuple else {k: v[a:b] for k, v in batch.items()}  # type: ignore[union-attr]
        if type(times) is float:
            oldest, times = times, [times] * (b - a)
        else:
            times = times[a:b]  # type: ignore[index]
            oldest = min(times)
        redelivered = 0 if self.redelivered is None else sum(self.redelivered[a:b])
        return part, self.ids[a:b], times, None if self.events is None else self.events[a:b], redelivered, oldest


@runtime_checkable
class EventConsumer(Protocol):
    """What :class:`StreamSource` needs from a broker's consumer (the interface a Kafka consumer implements).

    ``poll(max_events, timeout)`` returns up to ``max_events`` events, waiting at most ``timeout``
    seconds (``None``: until one comes) — an empty list when none came — and ``None`` once the
    stream has ended. ``ack(ids)`` tells the broker that those events are durably used (called only
    after a checkpoint that includes their updates). ``state_dict()`` is what a checkpoint keeps to
    resume (given to ``load_state_dict`` before the first poll of a resumed run, with ``included``:
    the ids of events whose updates the checkpoint includes but which may not be acknowledged yet).

    Two methods are optional: ``quarantine(letters)`` stores poison events (:class:`DeadLetter`) at the broker
    before they are acknowledged (a Redis dead-letter stream); ``replay(state) -> int`` is called after a resume
    fell back past unreadable checkpoints to the one whose consumer state is ``state``, and reads again, before
    anything else, the events acknowledged after it (without it, such a fall-back is refused).
    """

    def poll(self, max_events: int, timeout: float | None) -> list[Event] | None: ...

    def ack(self, ids: Sequence[Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class IterableEvents:
    """Events from any iterable of samples, numbered 0, 1, 2, ... in order.

    With ``threaded=True`` a daemon thread reads the iterable, so that a wait for the next event
    can time out (needed to cut batches on time); otherwise each event is read when asked for.
    A resumed run skips the events its checkpoint has used: give it the same iterable from its start.
    """

    def __init__(self, events: Iterable[Any], threaded: bool = False) -> None:
        self._events = events
        self._threaded = threaded
        # A list or tuple is sliced (no wait on it ever blocks): it may be read ahead of the batch.
        self.never_blocks = not threaded and isinstance(events, Sequence)
        self._iterator: Iterator[Any] | None = None
        self._queue: queue.Queue[Any] | None = None
        self._next_id = 0  # id of the next event read
        self._used = 0  # events acknowledged: a resumed run skips them
        self._ended = False

    def _start(self) -> None:
        iterator = itertools.islice(iter(self._events), self._used, None)
        self._next_id = self._used
        if not self._threaded:
            self._iterator = iterator
            return
        slots: queue.Queue[Any] = queue.Queue(maxsize=4096)
        self._queue = slots

        def read() -> None:
            try:
                for sample in iterator:
                    slots.put((sample, time.time()))
            except BaseException as error:  # handed to the consumer
                slots.put(error)
            slots.put(None)

        threading.Thread(target=read, daemon=True, name="batchfit-stream").start()

    def poll(self, max_events: int, timeout: float | None) -> list[Event] | None:
        """Up to ``max_events`` events; waits at most ``timeout`` seconds for the first (threaded only)."""
        chunk = self.poll_chunk(max_events, timeout)
        if chunk is None:
            return None
        times = chunk.times if isinstance(chunk.times, list) else [chunk.times] * len(chunk.samples)
        return [Event(i, sample, t) for i, sample, t in zip(chunk.ids, chunk.samples, times)]

    def poll_chunk(self, max_events: int, timeout: float | None) -> Chunk | None:
        """:meth:`poll` without an :class:`Event` per event: the samples, their ids (a ``range``) and times."""
        if self._ended:
            return None
        if self._iterator is None and self._queue is None and not self.never_blocks:
            self._start()
        times: list[float] | float
        if self.never_blocks:
            assert isinstance(self._events, Sequence)
            if self._next_id < self._used:
                self._next_id = self._used
            samples = list(self._events[self._next_id : self._next_id + max_events])
            times = time.time()
        elif self._queue is None:
            assert self._iterator is not None
            samples = list(itertools.islice(self._iterator, max_events))
            times = time.time()
        else:
            samples, times = [], []
            try:
                item = self._queue.get(timeout=timeout)
                while True:
                    if item is None or isinstance(item, BaseException):
                        self._ended = True
                        if isinstance(item, BaseException):
                            raise item
                        break
                    samples.append(item[0])
                    times.append(item[1])
                    if len(samples) == max_events:
                        break
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
        if not samples and (self._queue is None or self._ended):
            self._ended = True
            return None
        first = self._next_id
        self._next_id += len(samples)
        return Chunk(samples, range(first, self._next_id), times)

    def ack(self, ids: Sequence[Any]) -> None:
        """Count acknowledged events (ids are consecutive from where the last ack ended)."""
        if ids:
            self._used = max(self._used, int(max(ids)) + 1)

    def state_dict(self) -> dict[str, Any]:
        """How many events the run has used."""
        return {"used": self._used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip the events a checkpoint has used (and those it includes but had not acknowledged)."""
        used = int(state.get("used", 0))
        pending = [int(i) for i in state.get("included", [])]
        self._used = max([used] + [i + 1 for i in pending])
        self._iterator, self._queue, self._ended = None, None, False
        self._next_id = self._used

    def replay(self, state: dict[str, Any]) -> int:
        """After a fall-back to an older checkpoint: nothing to do, its ``used`` count is where reading starts
        again (acknowledgements of an iterable live only in checkpoints). Returns 0."""
        return 0

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class StreamBatch:
    """A batch cut from a stream: the tensors, the events' ids and production times, and why it closed."""

    batch: Batch
    ids: Sequence[Any]  # a list, or a range for the numbered events of a plain iterable
    times: list[float]
    size: int
    reason: str  # "size", "latency" or "end"
    redelivered: int = 0  # events of the batch that had been delivered before
    quarantined: list[Any] = dataclasses.field(default_factory=list)  # poison events acknowledged with the batch
    # The events themselves, in order, when the consumer gave Event objects (a broker's); empty for a plain
    # iterable, whose events are only columns (:meth:`event` rebuilds one).
    events: list[Event] = dataclasses.field(default_factory=list)
    oldest_time: float | None = None  # the smallest of ``times``, when known as the batch was cut

    def oldest(self) -> float:
        """When the oldest event of the batch was produced (the smallest of ``times``)."""
        return min(self.times) if self.oldest_time is None else self.oldest_time

    def event(self, row: int) -> Event:
        """The event of ``row``: the consumer's, or one rebuilt from the batch's columns."""
        if self.events:
            return self.events[row]
        batch = self.batch
        sample = ({k: _item(v[row]) for k, v in batch.items()} if isinstance(batch, dict)
                  else tuple(_item(v[row]) for v in batch))
        return Event(self.ids[row], sample, self.times[row])


def _item(value: torch.Tensor) -> Any:
    return value.item() if value.dim() == 0 else value


class StreamSource:
    """A stream of events for :meth:`Trainer.fit <batchfit.Trainer.fit>`, cut into batches by size or time.

    ``events`` is any iterable of samples (tuples or dicts of numbers or arrays) or an
    :class:`EventConsumer` such as :class:`~batchfit.RedisStream`. A batch closes at the
    trainer's ``batch_size`` events, or ``max_latency`` seconds after its first event arrived,
    whichever comes first.

    ``max_batch_size`` (with ``max_latency``; one process) lets a trainer that falls behind catch up: while the
    oldest buffered event was produced more than ``max_latency`` seconds ago, each batch doubles, up to
    ``max_batch_size`` (fewer, larger steps drain the backlog faster: a step's fixed cost is shared by more
    events); once the lag is back under ``max_latency`` it halves back to ``batch_size``. Give a
    ``max_batch_size`` at which the model still learns per event (at most the critical batch size that
    ``bf.tune`` or the noise scale measures); the optimizer's lr is unchanged, so each event's step shrinks.
    ``max_batch_size="auto"`` measures that bound on the stream itself: the cap is ``batch_size`` times the
    largest power of two that stays at or under a lower confidence bound of the simple noise scale, estimated
    every few steps from the gradients of the two halves of the step's batch, and rising at most twofold per
    estimate (history columns ``batch_cap``, ``noise_scale_low``; docs/streams.md).
    """

    def __init__(self, events: Any, max_latency: float | None = None, *,
                 ranges: Mapping[str | int, tuple[float, float]] | None = None,
                 on_dead_letter: Callable[[DeadLetter], Any] | None = None,
                 max_batch_size: int | str | None = None) -> None:
        if max_latency is not None and (isinstance(max_latency, bool) or not isinstance(max_latency, (int, float))
                                        or not max_latency > 0 or max_latency == float("inf")):
            raise expected("max_latency", "a positive number of seconds or None", max_latency)
        if isinstance(events, EventConsumer):
            self.consumer: EventConsumer = events
        elif isinstance(events, Iterable) and not isinstance(events, (str, bytes, Mapping)):
            self.consumer = IterableEvents(events, threaded=max_latency is not None)
        else:
            raise expected("events", "an iterable of events or an EventConsumer (e.g. bf.streams.RedisStream)",
                           type(events).__name__)
        if on_dead_letter is not None and not callable(on_dead_letter):
            raise expected("on_dead_letter", "a callable dead_letter -> None, or None", on_dead_letter)
        self.max_latency = None if max_latency is None else float(max_latency)
        if max_batch_size is not None:
            if max_batch_size != "auto" and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                             or max_batch_size < 1):
                raise expected("max_batch_size", 'a positive integer, "auto" or None', max_batch_size)
            if max_latency is None:
                raise expected("max_batch_size", "None without a max_latency (the lag it reacts to is measured "
                               "against max_latency)", max_batch_size)
        self.max_batch_size = max_batch_size
        self.names: tuple[str, ...] | None = None
        self.last_batch: StreamBatch | None = None  # the batch handed out last (a callback may read its ids)
        self._segments: collections.deque[Segment] = collections.deque()  # buffered events, as columns
        self._buffered = 0  # events in the segments
        self._opened: float | None = None  # when the first event of the batch being filled arrived
        self.ended = False
        self.read_ahead = READ_AHEAD  # events asked of the consumer at once (at least what a batch is missing)
        self.check = SampleCheck(ranges, getattr(events, "fields", None))
        # Floating fields are cast to this dtype as they are admitted (once per read, not per batch): the trainer
        # sets the model's, to which every batch is cast on its way to it anyway.
        self._float_dtype: torch.dtype | None = None
        self.on_dead_letter = on_dead_letter
        self.dead_letters: collections.deque[DeadLetter] = collections.deque(maxlen=DEAD_LETTERS_KEPT)
        self.quarantined = 0  # events this source has quarantined
        self._arrivals = 0  # events read so far (numbers the order of arrival)
        self._poison: list[tuple[int, Any]] = []  # (arrival number, id) of quarantined events not yet acknowledged

    def next_batch(self, batch_size: int, wait: float = TICK_SECONDS) -> StreamBatch | None:
        """The next batch, or ``None`` when none closed within about ``wait`` seconds (or the stream ended).

        Events read stay buffered between calls, so a caller may look at signals and budgets
        between two calls without losing any.
        """
        if self._buffered < batch_size:
            self.fill(batch_size, wait)
        if self._buffered >= batch_size:
            return self.cut(batch_size, "size")
        if self._buffered and self.latency_due():
            return self.cut(batch_size, "latency")
        if self._buffered and self.ended:
            return self.cut(batch_size, "end")
        return None

    def fill(self, wanted: int, wait: float = TICK_SECONDS) -> None:
        """Read events until ``wanted`` are buffered, ``max_latency`` has passed since the first buffered one
        arrived, about ``wait`` seconds have passed (after one read at least) or the stream has ended."""
        give_up = time.monotonic() + wait
        consumer = self.consumer
        blocking = self.max_latency is None and isinstance(consumer, IterableEvents)
        ahead = not blocking or getattr(consumer, "never_blocks", False)
        chunks = getattr(consumer, "poll_chunk", None)
        polled = False
        while not self.ended and self._buffered < wanted:
            now = time.monotonic()
            close_at = math.inf
            if self._buffered and self.max_latency is not None:
                assert self._opened is not None
                close_at = self._opened + self.max_latency
            if now >= close_at or polled and now >= give_up:
                return
            # A plain iterable without max_latency is read as it comes: nothing waits on a clock.
            timeout = None if blocking else max(0.0, min(close_at, give_up) - now)
            # Read ahead (one round trip to a broker for many small batches; what is read stays buffered), but
            # never wait on a blocking iterable for more events than the batch needs.
            missing = wanted - self._buffered
            count = max(missing, self.read_ahead) if ahead else missing
            polled = True
            if callable(chunks):
                chunk = chunks(count, timeout)
                if chunk is None:
                    self.ended = True
                    return
                segment = self._admit_chunk(chunk, time.monotonic())
            else:
                events = consumer.poll(count, timeout)
                if events is None:
                    self.ended = True
                    return
                segment = self._admit(events, time.monotonic())
            if segment is not None:
                if not self._buffered:
                    self._opened = segment.arrived
                self._segments.append(segment)
                self._buffered += segment.left

    def _admit_chunk(self, chunk: Chunk, received: float) -> Segment | None:
        """The chunk's events that can be trained on, collated once into a :class:`Segment` (``None``: none can);
        the others are quarantined (see :meth:`quarantine`)."""
        samples = chunk.samples
        if not samples:
            return None
        first = self._arrivals
        columns = self.check.columns(samples)
        if columns is not None:  # proven good column by column: no Python object per event
            self._arrivals += len(samples)
            self.names = None
            return Segment(self._cast(tuple([torch.from_numpy(c) for c in columns])),
                           chunk.ids, chunk.times, first, received)
        times = chunk.times if isinstance(chunk.times, list) else [chunk.times] * len(samples)
        return self._admit([Event(i, sample, t) for i, sample, t in zip(chunk.ids, samples, times)], received,
                           keep_events=False)

    def _admit(self, events: list[Event], received: float, keep_events: bool = True) -> Segment | None:
        """The events that can be trained on, collated once into a :class:`Segment` (``None``: none can); the others
        are quarantined (see :meth:`quarantine`)."""
        if not events:
            return None
        numbers: list[int] | int = self._arrivals
        if self.check.all_good([event.sample for event in events if event.error is None]) and not any(
                event.error is not None for event in events):
            self._arrivals += len(events)
            good = events
        else:
            good, numbers = [], []
            bad: list[tuple[int, Event, str]] = []
            for event in events:
                number = self._arrivals
                self._arrivals += 1
                reason = event.error if event.error is not None else self.check(event.sample)
                if reason is None:
                    good.append(event)
                    numbers.append(number)
                else:
                    bad.append((number, event, reason))
            if bad:
                self.quarantine([event for _, event, _ in bad], [reason for _, _, reason in bad])
                self._poison += [(number, event.id) for number, event, _ in bad]
            if not good:
                return None
        batch = self._cast(collate([e.sample for e in good], [e.id for e in good]))
        self.names = tuple(batch) if isinstance(batch, dict) else None
        redelivered = [e.redelivered for e in good]
        return Segment(batch, [e.id for e in good], [e.time for e in good], numbers, received,
                       good if keep_events else None, redelivered if any(redelivered) else None)

    @property
    def float_dtype(self) -> torch.dtype | None:
        """What floating fields are cast to as they are admitted (``None``: left as read); setting it casts the events
        buffered already too, so that every buffered batch is in it."""
        return self._float_dtype

    @float_dtype.setter
    def float_dtype(self, dtype: torch.dtype | None) -> None:
        self._float_dtype = dtype
        for segment in self._segments:
            segment.batch = self._cast(segment.batch)

    def _cast(self, batch: Batch) -> Batch:
        """``batch`` with its floating tensors cast to :attr:`float_dtype` (when set)."""
        dtype = self.float_dtype
        if dtype is None:
            return batch

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

        return {k: cast(v) for k, v in batch.items()} if isinstance(batch, dict) else tuple([cast(v) for v in batch])

    def quarantine(self, events: Sequence[Event], reasons: Sequence[str]) -> None:
        """Take ``events`` out of training for good: to the consumer's dead letters (``quarantine(letters)``, e.g.
        a Redis dead-letter stream), ``on_dead_letter``, :attr:`dead_letters` (the newest 1,000) and the log.

        The caller acknowledges them at the broker afterwards, with the trained events around them.
        """
        letters = [DeadLetter(e.id, reason, None if e.error is not None else e.sample, e.raw)
                   for e, reason in zip(events, reasons)]
        handler = getattr(self.consumer, "quarantine", None)
        if callable(handler):
            handler(letters)  # stored at the broker before anything acknowledges the events
        for letter in letters:
            if self.on_dead_letter is not None:
                self.on_dead_letter(letter)
            self.dead_letters.append(letter)
            self.quarantined += 1
            if self.quarantined <= LOGGED_DEAD_LETTERS or self.quarantined % 1000 == 0:
                logger.warning("quarantined event %r (never trained on): %s%s", letter.id, letter.reason,
                               "" if self.quarantined < LOGGED_DEAD_LETTERS else
                               f" ({self.quarantined} so far; further ones are logged every 1,000th)")

    def take_quarantined(self) -> list[Any]:
        """The ids of quarantined events that may be acknowledged now: those read before every buffered event
        (a consumer that acknowledges a position, such as :class:`IterableEvents`, must not skip one)."""
        if not self._poison:
            return []
        limit = self._segments[0].first_number() if self._segments else math.inf
        ready = [event_id for number, event_id in self._poison if number < limit]
        self._poison = [(number, event_id) for number, event_id in self._poison if number >= limit]
        return ready

    @property
    def buffered(self) -> int:
        """Events read from the consumer and not yet handed out in a batch."""
        return self._buffered

    def lag(self) -> float:
        """Seconds since the oldest buffered event was produced (its ``time``); 0 when none is buffered."""
        if not self._segments:
            return 0.0
        segment = self._segments[0]
        times = segment.times
        return time.time() - (times if isinstance(times, float) else times[segment.start])

    def age(self) -> float:
        """Seconds since the first buffered event arrived (0 when none is buffered)."""
        return 0.0 if self._opened is None else time.monotonic() - self._opened

    def latency_due(self) -> bool:
        """Whether the buffered events have waited ``max_latency`` seconds (never without a ``max_latency``)."""
        return self.max_latency is not None and self._opened is not None and self.age() >= self.max_latency

    def cut(self, count: int, reason: str) -> StreamBatch:
        """A batch of the first ``count`` buffered events (fewer when fewer are buffered; at least one)."""
        if not self._buffered:
            raise InputError("StreamSource.cut: no event is buffered (call fill() or next_batch() first)")
        segments = self._segments
        parts = []
        wanted = count
        while wanted and segments:
            segment = segments[0]
            parts.append(segment.take(wanted))
            wanted -= len(parts[-1][1])
            if not segment.left:
                segments.popleft()
        size = count - wanted
        self._buffered -= size
        self._opened = segments[0].arrived if segments else None
        if len(parts) == 1:
            batch, ids, times, events, redelivered, oldest = parts[0]
        else:  # the batch spans segments: their columns joined (dtypes promoted as one collate would)
            pieces: list[Any] = [p[0] for p in parts]
            first = pieces[0]
            batch = ({k: torch.cat([piece[k] for piece in pieces]) for k in first} if isinstance(first, dict) else
                     tuple(torch.cat([piece[i] for piece in pieces]) for i in range(len(first))))
            ids = [i for p in parts for i in p[1]]
            times = [t for p in parts for t in p[2]]
            events = None if any(p[3] is None for p in parts) else [e for p in parts for e in p[3]]  # type: ignore[union-attr]
            redelivered = sum(p[4] for p in parts)
            oldest = min(p[5] for p in parts)
        self.last_batch = StreamBatch(batch, ids, times, size, reason, redelivered,
                                      self.take_quarantined() if self._poison else [], events or [], oldest)
        return self.last_batch

    def drop_buffer(self) -> None:
        """Forget events read but not yet in a batch (a stopped run re-reads them after resuming), and the
        quarantined ones among them (in the dead letters already; read again, they are quarantined again)."""
        ready = self.take_quarantined()  # read before every dropped event: may be acknowledged
        self._poison = [(-1, event_id) for event_id in ready]
        self._segments, self._buffered, self._opened = collections.deque(), 0, None

    def ack(self, ids: Sequence[Any]) -> None:
        """Acknowledge events whose updates a durable checkpoint includes."""
        self.consumer.ack(list(ids))

    def state_dict(self) -> dict[str, Any]:
        """The consumer's state, for checkpoints."""
        return self.consumer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the consumer's state before the first batch of a resumed run."""
        self.drop_buffer()
        self.ended = False
        self.consumer.load_state_dict(state)

    def close(self) -> None:
        """Release the consumer's connection."""
        self.consumer.close()


class SampleCheck:
    """Whether an event can be trained on: ``None`` when it can, else the reason in words.

    The first event that passes sets the stream's fields (a dict's keys or a tuple's width) and each field's
    shape; every later event must have the same. Every value is a number or a numeric array, integers fit
    int64, floats are finite, and a field named in ``ranges`` (by name: a dict's key or one of the
    consumer's ``fields``; or by position) lies in ``[low, high)``.
    """

    def __init__(self, ranges: Mapping[str | int, tuple[float, float]] | None = None,
                 names: Sequence[str] | None = None) -> None:
        if ranges is not None:
            if not isinstance(ranges, Mapping) or not all(_is_range(r) for r in ranges.values()):
                raise expected("ranges", "a dict of field -> (low, high), e.g. {'user': (0, 943)}", ranges)
        self.ranges = dict(ranges or {})
        self.names = None if names is None else tuple(names)
        self.fields: Any = None  # a dict's keys or a tuple's width, of the first event that passed
        self.shapes: list[tuple[int, ...]] = []
        self.bounds: list[tuple[float, float] | None] = []

    def __call__(self, sample: Any) -> str | None:
        if isinstance(sample, Mapping):
            fields: Any = tuple(sample)
            if self.fields is not None and isinstance(self.fields, tuple) and set(fields) == set(self.fields):
                fields = self.fields  # the same fields in another order: the same event
            values = [sample[k] for k in fields]
        elif isinstance(sample, (tuple, list)):
            fields, values = len(sample), list(sample)
        else:
            return f"an event must be a tuple (inputs..., target) or a dict, not a {type(sample).__name__}"
        if self.fields is not None and fields != self.fields:
            if isinstance(fields, tuple) and isinstance(self.fields, tuple):
                return f"its fields {list(fields)} differ from the stream's {list(self.fields)}"
            return f"it has {fields!r} fields; the stream's events have {self.fields!r}"
        labels = list(fields) if isinstance(fields, tuple) else [
            self.names[i] if self.names is not None and i < len(self.names) else str(i) for i in range(fields)]
        bounds = self.bounds if self.fields is not None else self._bounds(fields, labels)
        shapes = []
        for index, value in enumerate(values):
            shape, why = _check_value(value)
            if why is None and self.fields is not None and shape != self.shapes[index]:
                why = f"has shape {list(shape)}; the stream's has {list(self.shapes[index])}"
            limit = bounds[index]
            if why is None and limit is not None and not _within(value, limit):
                why = f"{_short(value)} is outside its range [{limit[0]:g}, {limit[1]:g})"
            if why is not None:
                return f"field {labels[index]!r}: {why}"
            shapes.append(shape)
        if self.fields is None:
            self.fields, self.shapes, self.bounds = fields, shapes, bounds
        return None

    def all_good(self, samples: list[Any]) -> bool:
        """Whether every one of ``samples`` passes, proven column by column in C loops (``False``: not proven; ask
        each sample). Tuples of Python numbers only, once the stream's fields are known: what a broker delivers."""
        return self.columns(samples) is not None

    def columns(self, samples: list[Any]) -> list[np.ndarray] | None:
        """:meth:`all_good`, returning the samples' columns as arrays when they all pass (``None``: not proven).

        Each column holds Python numbers only, converted by NumPy once and checked in its C loops: finite, within
        its range, and integers fit int64 (NumPy gives an unsigned or object array otherwise).
        """
        width = self.fields
        if not samples or not isinstance(width, int) or any(self.shapes):
            return None
        if not set(map(type, samples)) <= {tuple, list} or set(map(len, samples)) != {width}:
            return None
        arrays = []
        for column, limit in zip(zip(*samples), self.bounds):
            kinds = set(map(type, column))
            if not kinds <= {int, float, bool}:
                return None
            try:
                array = np.asarray(column)
            except OverflowError:
                return None
            kind = array.dtype.kind
            if kind not in "bif":  # ints past int64: an unsigned or object array
                return None
            if kind == "f":
                if not np.isfinite(array).all():
                    return None
                # Ints among floats fit int64 (one outside that span: not proven here, asked one by one).
                if kinds != {float} and (array.min() < INT64[0] or array.max() >= INT64[1]):
                    return None
            if limit is not None and (array.min() < limit[0] or array.max() >= limit[1]):
                return None
            arrays.append(array)
        return arrays

    def _bounds(self, fields: Any, labels: list[str]) -> list[tuple[float, float] | None]:
        unknown = [k for k in self.ranges if k not in labels and not (isinstance(k, int) and 0 <= k < len(labels))]
        if unknown:
            raise expected("ranges", f"ranges of the stream's fields {labels}", self.ranges)
        return [self.ranges.get(label, self.ranges.get(index)) for index, label in enumerate(labels)]


def _is_range(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] < value[1])


def _check_value(value: Any) -> tuple[tuple[int, ...], str | None]:
    """A value's shape, and what is wrong with it (``None``: nothing)."""
    kind = type(value)
    if kind is float:
        return (), None if math.isfinite(value) else f"{value} is not a finite number"
    if kind is int or kind is bool:
        return (), None if INT64[0] <= value < INT64[1] else f"{value} does not fit in int64"
    if isinstance(value, torch.Tensor):
        array: Any = value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
    elif isinstance(value, (np.ndarray, np.generic, list)):
        try:
            array = np.asarray(value)
        except (ValueError, OverflowError):
            return (), f"{_short(value)} is not a numeric array"
    else:
        return (), f"{_short(value)} is not a number"
    if array.dtype.kind not in "biuf":
        return tuple(array.shape), f"{_short(value)} is not a number (dtype {array.dtype})"
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return tuple(array.shape), f"{_short(value)} holds a value that is not finite"
    return tuple(array.shape), None


def _within(value: Any, limit: tuple[float, float]) -> bool:
    if isinstance(value, (int, float)):
        return bool(limit[0] <= value < limit[1])
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    return bool((array >= limit[0]).all() and (array < limit[1]).all())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def collate(samples: list[Any], ids: Sequence[Any] = ()) -> Batch:
    """Stack samples (all tuples of the same length, or all dicts with the same keys) into one batch.

    One array per field: Python numbers become int64 or float64 arrays (floating inputs are cast to
    the model's dtype on their way to it), arrays are stacked along a new first dimension.
    """
    first = samples[0]
    if isinstance(first, Mapping):
        keys = tuple(first)
        for index, sample in enumerate(samples):
            if not isinstance(sample, Mapping) or len(sample) != len(keys) or any(k not in sample for k in keys):
                raise _mismatch(index, ids, f"a dict with keys {list(keys)}", sample)
        return {k: _stack([s[k] for s in samples], k) for k in keys}
    if isinstance(first, (tuple, list)):
        width = len(first)
        for index, sample in enumerate(samples):
            if not isinstance(sample, (tuple, list)) or len(sample) != width:
                raise _mismatch(index, ids, f"a tuple of {width} fields", sample)
        return tuple(_stack([s[i] for s in samples], f"field {i}") for i in range(width))
    raise expected("events", "tuples (inputs..., target) or dicts of numbers or arrays",
                   f"an event of type {type(first).__name__}")


def _stack(values: list[Any], name: str) -> torch.Tensor:
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values)
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise expected("events", f"numbers or numeric arrays in {name}", f"values of dtype {array.dtype}")
    return torch.from_numpy(array)


def _mismatch(index: int, ids: Sequence[Any], what: str, sample: Any) -> BatchfitError:
    where = f"event {ids[index]!r}" if index < len(ids) else f"event {index} of the batch"
    return InputError(f"every event of a stream must have the same fields: expected {what}. "
                         f"Received: {where} = {sample!r}")
