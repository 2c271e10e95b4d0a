"""A Redis Streams consumer for :class:`~batchfit.StreamSource`: one consumer of a consumer group.

Reads with ``XREADGROUP`` (new events: ``>``), acknowledges with ``XACK`` only when the trainer
says a durable checkpoint includes the events' updates, re-reads its own pending events first
after a restart, and takes over (``XAUTOCLAIM``) events that another consumer of the group left
pending for longer than ``claim_idle`` seconds — a consumer that died. A live consumer's events may
wait unacknowledged for longer than that (until a checkpoint includes them), so while it reads, a
consumer renews its hold on them (``XCLAIM ... JUSTID`` of its own pending events, every third of
``claim_idle``), and only a consumer that stopped reading loses its events to the others. Needs the
``redis`` client (``pip install "batchfit[stream]"``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import CheckpointError, InputError, StreamError, expected, mask_secrets
from .streams import DeadLetter, Event

logger = logging.getLogger("batchfit")
# What `start` may be: "0", "$", or a stream id "<ms>" / "<ms>-<seq>".
_STREAM_ID = re.compile(r"^(\$|\d+(-\d+)?)$")

ACK_CHUNK = 1000


def _redis() -> Any:
    try:
        import redis
    except ImportError as error:
        raise InputError('RedisStream needs the redis client: pip install "batchfit[stream]" '
                            '(or: pip install redis hiredis)') from error
    return redis


def number(value: bytes) -> int | float:
    """A Redis field value as an int when it is written as one, else as a float."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def id_time(event_id: bytes | str) -> float:
    """The time (seconds since the epoch) a Redis stream id holds: when the server added the event."""
    text = event_id.decode() if isinstance(event_id, bytes) else event_id
    return int(text.split("-", 1)[0]) / 1000.0


class RedisStream:
    """Consumer ``consumer`` of group ``group`` on the Redis stream ``stream``.

    ``client`` is a ``redis.Redis`` or a URL (``"redis://host:6379/0"``). Each event's fields are
    numbers written as text; ``fields=("user", "item", "rating")`` makes each sample the tuple of
    those fields in that order, otherwise a dict of every field. ``decode(fields) -> sample``
    replaces this (``fields`` maps ``bytes`` names to ``bytes`` values). ``start`` is where a new
    group starts reading (``"0"``: the whole stream; ``"$"``: only events added from now).
    ``idle_timeout`` ends the stream after that many seconds without a new event (``None``: never).
    An entry that cannot be read (a missing field, a value that is not a number, a ``decode`` that raises)
    or that :class:`~batchfit.StreamSource` refuses is written to the dead-letter stream ``dead_letters``
    (``"<stream>:dead"`` by default; ``None``: none) with its reason and original id, then acknowledged
    with the batch after it.
    Give each consumer a name that stays the same across restarts, so that a restarted trainer
    re-reads its own pending events at once.
    """

    def __init__(self, client: Any, stream: str, group: str = "batchfit", consumer: str = "batchfit-0", *,
                 fields: Sequence[str] | None = None, decode: Callable[[Mapping[bytes, bytes]], Any] | None = None,
                 start: str = "0", claim_idle: float = 30.0, idle_timeout: float | None = None,
                 dead_letters: str | None = "", retry_for: float = 30.0) -> None:
        for name, value in (("stream", stream), ("group", group), ("consumer", consumer), ("start", start)):
            if not isinstance(value, str) or not value:
                raise expected(name, "a non-empty string", value)
        if fields is not None and (isinstance(fields, str) or not all(isinstance(f, str) for f in fields)):
            raise expected("fields", "a sequence of field names, e.g. ('user', 'item', 'rating')", fields)
        if dead_letters is not None and not isinstance(dead_letters, str):
            raise expected("dead_letters", "the name of a stream, '' (the default: '<stream>:dead') or None",
                           dead_letters)
        if decode is not None and not callable(decode):
            raise expected("decode", "a callable fields -> sample, or None", decode)
        if not _STREAM_ID.match(start):
            raise expected("start", "'0' (the whole stream), '$' (only new events) or a stream id such as "
                           "'1700000000000-0'", start)
        for name, seconds in (("claim_idle", claim_idle), ("idle_timeout", idle_timeout), ("retry_for", retry_for)):
            if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                        or seconds < 0):
                raise expected(name, "a non-negative number of seconds", seconds)
        if isinstance(client, str):
            self.url = mask_secrets(client)
            try:
                client = _redis().Redis.from_url(client)
            except ValueError as error:
                raise expected("client", f"a redis.Redis client or a URL such as redis://host:6379/0 (rediss:// for "
                               f"TLS, unix:///path.sock): {error}", self.url) from None
        elif not hasattr(client, "xreadgroup"):
            raise expected("client", "a redis.Redis client or a redis:// URL", type(client).__name__)
        else:
            self.url = _client_url(client)
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.fields = None if fields is None else tuple(fields)
        self.decode = decode
        self.start = start
        # Where poison events go ("<stream>:dead" by default); None: nowhere but the StreamSource's dead_letters.
        self.dead_letters = None if dead_letters is None else dead_letters or f"{stream}:dead"
        self.claim_idle = float(claim_idle)
        self.retry_for = float(retry_for)  # seconds to keep reconnecting before a StreamError
        self.idle_timeout = idle_timeout
        self._phase = "new"  # "new" -> "pending" (own pending events) -> "live" (new events, claims)
        self._pending_from = "0"
        self._last_claim = 0.0
        self._claim_from = "0-0"  # where the next XAUTOCLAIM continues ("0-0": a new scan)
        self._held: dict[str, None] = {}  # ids delivered to this consumer and not acknowledged yet, in order
        self._last_renewal = time.monotonic()
        self._last_event = time.monotonic()
        self._included: list[Any] = []
        self._resumed = False
        self._replay_from: dict[str, Any] | None = None  # a checkpoint's position, after a fall-back to it
        self._replay: list[Event] = []  # acknowledged events to train on again, delivered before anything else
        self.redelivered = 0  # events read again: own pending ones after a restart, or claimed

    # ------------------------------------------------------------------ EventConsumer
    def poll(self, max_events: int, timeout: float | None) -> list[Event] | None:
        """Up to ``max_events`` events: own pending ones first, then claimed ones, then new ones."""
        if self._phase == "new":
            self._join()
        if self._replay:
            events, self._replay = self._replay[:max_events], self._replay[max_events:]
            return events
        if self._phase == "pending":
            events = self._read_pending(max_events)
            if events:
                return events
            self._phase = "live"
            self._last_claim = 0.0
        now = time.monotonic()
        if self._held and now - self._last_renewal >= self.claim_idle / 3:
            self._renew()
        if self._claim_from != "0-0" or now - self._last_claim >= max(self.claim_idle, 1.0):
            # A claim scans the group's pending list in pages: the next page is claimed at the next poll.
            self._last_claim = now
            claimed = self._claim(max_events)
            if claimed:
                self._last_event = now
                return claimed
        events = self._read_new(max_events, timeout)
        now = time.monotonic()
        if events:
            self._last_event = now
        elif self.idle_timeout is not None and now - self._last_event >= self.idle_timeout:
            return None
        return events

    def ack(self, ids: Sequence[Any]) -> None:
        """``XACK`` the events (in chunks)."""
        ids = list(ids)
        for start in range(0, len(ids), ACK_CHUNK):
            self._do("XACK", self.client.xack, self.stream, self.group, *ids[start : start + ACK_CHUNK])
        for event_id in ids:
            self._held.pop(_text(event_id), None)

    def state_dict(self) -> dict[str, Any]:
        """Where this consumer reads: the broker keeps the rest (pending events, the group's position).

        Once the group is joined, also ``position``: the group's last delivered id and its pending ids now, from
        which :meth:`replay` finds the events acknowledged after this checkpoint should a newer one be lost.
        """
        state: dict[str, Any] = {"stream": self.stream, "group": self.group, "consumer": self.consumer}
        if self._phase != "new":
            group = self._group_info()
            state["position"] = {"last_delivered": group["last-delivered-id"],
                                 "entries_read": group.get("entries-read"), "pending": self._pending_ids()}
        return state

    def replay(self, state: dict[str, Any]) -> int:
        """The checkpoint ``state`` (loaded already) is older than unreadable ones: read the events acknowledged
        after it again, before anything else. Those are the events pending at the checkpoint that it did not
        include, and those delivered after it, less the ones pending now (delivered again anyway). Raises
        :class:`~batchfit.CheckpointError` when the stream no longer holds every one of them. Returns how many."""
        position = state.get("position")
        if not isinstance(position, dict):
            raise CheckpointError("that checkpoint holds no stream position (written before the consumer read)")
        self._replay_from = {**position, "included": [str(i) for i in state.get("included", [])]}
        self._phase = "new"
        self._join()
        return len(self._replay)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: events the checkpoint includes are acknowledged when the group is joined, not re-read."""
        self._included = [i.decode() if isinstance(i, bytes) else str(i) for i in state.get("included", [])]
        self._resumed = "group" in state  # a checkpoint written while reading the group: it must still exist
        self._phase = "new"
        self._held = {}  # the pending events are read again when the group is joined

    def close(self) -> None:
        """Close the connection pool."""
        try:
            self.client.close()
        except Exception as error:  # a server gone already: nothing left to release
            logger.debug("closing %s: %s", self.url, error)

    # ------------------------------------------------------------------ faults
    def _where(self) -> str:
        return f"Redis at {self.url}, stream {self.stream!r}, group {self.group!r}"

    def _do(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``; a lost connection is retried with backoff for ``retry_for`` seconds, and
        every Redis error becomes a :class:`~batchfit.StreamError` naming the server, stream and group."""
        redis = _redis()
        first_failure: float | None = None
        delay = 0.05
        while True:
            try:
                result = call(*args, **kwargs)
            except redis.AuthenticationError as error:  # a ConnectionError too: never retried
                raise StreamError(f"{self._where()}: the server refused the credentials ({error}); give the "
                                  f"password in the URL, redis://:PASSWORD@host:port/db (or "
                                  f"redis://USER:PASSWORD@...)") from None
            except (redis.ConnectionError, redis.TimeoutError) as error:
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    logger.warning("%s: %s failed (%s); reconnecting for up to %g s", self._where(), what, error,
                                   self.retry_for)
                if now - first_failure >= self.retry_for:
                    raise StreamError(f"{self._where()}: cannot reach the server ({type(error).__name__}: {error}); "
                                      f"retried for {self.retry_for:g} s (retry_for=). Is redis-server running "
                                      f"at that host and port?") from None
                time.sleep(min(delay, max(0.0, first_failure + self.retry_for - now)))
                delay = min(2 * delay, 2.0)
                continue
            except redis.ResponseError as error:
                raise self._refused(what, error) from None
            if first_failure is not None:
                logger.warning("%s: reconnected after %.1f s", self._where(), time.monotonic() - first_failure)
            return result

    def _gone(self, text: str) -> StreamError:
        return StreamError(f"{self._where()}: the stream or its consumer group no longer exists ({text}); it was "
                           f"deleted, or the server restarted without persistence. The group's position and "
                           f"pending events are gone with it: recreate the group where training stopped "
                           f"(XGROUP CREATE {self.stream} {self.group} <last trained id> MKSTREAM), or start "
                           f"over in a new checkpoint_dir")

    def _refused(self, what: str, error: Exception) -> Exception:
        text = str(error)
        if "BUSYGROUP" in text:
            return error  # the group exists: what _join expects
        if "NOGROUP" in text or "no such key" in text:
            return self._gone(text)
        if "NOAUTH" in text or "WRONGPASS" in text or "NOPERM" in text:
            return StreamError(f"{self._where()}: {what} refused: {text}; give the password (and user) in the URL, "
                               f"redis://USER:PASSWORD@host:port/db")
        if "Invalid stream ID" in text and what == "XGROUP CREATE":
            return StreamError(f"{self._where()}: start={self.start!r} is not a valid stream id ({text})")
        if "WRONGTYPE" in text:
            return StreamError(f"{self._where()}: the key {self.stream!r} holds something else than a stream ({text})")
        return StreamError(f"{self._where()}: {what} failed: {text}")

    # ------------------------------------------------------------------ steps
    def _join(self) -> None:
        if self._resumed and not self._group_exists():
            raise StreamError(f"{self._where()}: the checkpoint was written while reading this group, which no "
                              f"longer exists (deleted, or the server restarted without persistence): where it "
                              f"stood and its pending events are lost, and a new group would train on the stream "
                              f"again from start={self.start!r}. Recreate the group where training stopped "
                              f"(XGROUP CREATE {self.stream} {self.group} <last trained id> MKSTREAM), or start "
                              f"over in a new checkpoint_dir")
        try:
            self._do("XGROUP CREATE", self.client.xgroup_create, self.stream, self.group, id=self.start, mkstream=True)
        except _redis().ResponseError as error:  # only BUSYGROUP comes through: the group exists
            assert "BUSYGROUP" in str(error)
        if self._replay_from is not None:
            self._replay = self._lost_since(self._replay_from)
            self._replay_from = None
        if self._included:
            self.ack(self._included)  # a crash came between the checkpoint and its XACK
            self._included = []
        self._phase, self._pending_from = "pending", "0"
        self._last_event = time.monotonic()

    def _group_info(self) -> dict[str, Any]:
        groups = self._do("XINFO GROUPS", self.client.xinfo_groups, self.stream)
        for group in groups:
            if _text(group.get("name", b"")) == self.group:
                return {_text(k): _text(v) if isinstance(v, bytes) else v for k, v in group.items()}
        raise self._gone(f"NOGROUP: XINFO GROUPS {self.stream} lists no group {self.group!r}")

    def _pending_ids(self) -> list[str]:
        """Every id pending in the group (of any consumer), in order."""
        found: list[str] = []
        start = "-"
        while True:
            page = self._do("XPENDING", self.client.xpending_range, self.stream, self.group, min=start, max="+",
                            count=ACK_CHUNK)
            found += [_text(entry["message_id"]) for entry in page]
            if len(page) < ACK_CHUNK:
                return found
            start = "(" + found[-1]

    def _lost_since(self, position: dict[str, Any]) -> list[Event]:
        """The events acknowledged after a checkpoint at ``position``, read again from the stream (see replay)."""
        then = str(position["last_delivered"])
        group = self._group_info()
        now = group["last-delivered-id"]
        skip = set(self._pending_ids()) | set(self._included) | set(position.get("included", []))
        wanted = [i for i in map(str, position.get("pending", [])) if i not in skip]
        entries: dict[str, Any] = {}
        if _order(now) > _order(then):  # delivered since the checkpoint: the whole range, in pages
            info = self._do("XINFO STREAM", self.client.xinfo_stream, self.stream)
            deleted = _text(info.get("max-deleted-entry-id", b"0-0"))
            if _order(deleted) > _order(then):
                raise CheckpointError(
                    f"{self._where()}: entries after the checkpoint's last delivered id {then} were deleted or "
                    f"trimmed from the stream (its max-deleted-entry-id is {deleted}), so the events acknowledged "
                    f"since may be gone")
            start = "(" + then
            while True:
                page = self._do("XRANGE", self.client.xrange, self.stream, start, now, count=ACK_CHUNK)
                entries.update((_text(i), v) for i, v in page)
                if len(page) < ACK_CHUNK:
                    break
                start = "(" + _text(page[-1][0])
            delivered = _delivered_since(position.get("entries_read"), group.get("entries-read"))
            first = _text(info["first-entry"][0]) if info.get("first-entry") else now
            if delivered is not None and len(entries) < delivered or delivered is None and _order(first) > _order(then):
                raise CheckpointError(
                    f"{self._where()}: the group was delivered {delivered if delivered is not None else 'more'} "
                    f"events after the checkpoint's last delivered id {then}, and the stream holds {len(entries)} of "
                    f"them: the others were deleted or trimmed (its first entry is {first})")
        for event_id in wanted:  # pending at the checkpoint, not in it, acknowledged since
            page = self._do("XRANGE", self.client.xrange, self.stream, event_id, event_id, count=1)
            if not page:
                raise CheckpointError(f"{self._where()}: event {event_id}, acknowledged after the checkpoint, is no "
                                      f"longer in the stream (deleted or trimmed)")
            entries[event_id] = page[0][1]
        events = []
        for event_id in sorted((i for i in entries if i not in skip), key=_order):
            sample, error = self._sample(event_id, entries[event_id])
            events.append(Event(event_id, sample, id_time(event_id), True, error, entries[event_id]))
        self.redelivered += len(events)
        return events

    def _group_exists(self) -> bool:
        try:
            groups = self._do("XINFO GROUPS", self.client.xinfo_groups, self.stream)
        except StreamError:  # no such stream
            return False
        return any(_text(g.get("name", g.get(b"name", b""))) == self.group for g in groups)

    def _read_pending(self, count: int) -> list[Event]:
        reply = self._do("XREADGROUP", self.client.xreadgroup, self.group, self.consumer,
                         {self.stream: self._pending_from}, count=count)
        entries = reply[0][1] if reply else []
        if entries:
            self._pending_from = _text(entries[-1][0])
        return self._events(entries, redelivered=True)

    def _claim(self, count: int) -> list[Event]:
        reply = self._do("XAUTOCLAIM", self.client.xautoclaim, self.stream, self.group, self.consumer,
                         int(self.claim_idle * 1000), start_id=self._claim_from, count=count)
        self._claim_from = _text(reply[0])
        # Own events (held longer than claim_idle between two renewals) are in flight here already.
        entries = [entry for entry in (reply[1] if len(reply) > 1 else []) if _text(entry[0]) not in self._held]
        return self._events(entries, redelivered=True)

    def _renew(self) -> None:
        """Reset the idle time of this consumer's pending events, so that no other consumer claims them."""
        held = list(self._held)
        for start in range(0, len(held), ACK_CHUNK):
            self._do("XCLAIM", self.client.xclaim, self.stream, self.group, self.consumer, 0,
                     held[start : start + ACK_CHUNK], justid=True)
        self._last_renewal = time.monotonic()

    def _read_new(self, count: int, timeout: float | None) -> list[Event]:
        block = None if timeout == 0 else (0 if timeout is None else max(1, int(timeout * 1000 + 0.999)))
        reply = self._do("XREADGROUP", self.client.xreadgroup, self.group, self.consumer, {self.stream: ">"},
                         count=count, block=block)
        return self._events(reply[0][1] if reply else [], redelivered=False)

    def _events(self, entries: list[Any], redelivered: bool) -> list[Event]:
        events, gone = [], []
        for event_id, values in entries:
            if values is None or not values:  # deleted from the stream while pending: nothing to train on
                gone.append(event_id)
                continue
            sample, error = self._sample(event_id, values)
            events.append(Event(_text(event_id), sample, id_time(event_id), redelivered, error, values))
            self._held[_text(event_id)] = None
        if gone:
            self.ack(gone)
        if redelivered:
            self.redelivered += len(events)
        return events

    def _sample(self, event_id: Any, values: Mapping[bytes, bytes]) -> tuple[Any, str | None]:
        """The sample of an entry, or ``(None, why)`` for an entry that cannot be read (a poison event)."""
        if self.decode is not None:
            try:
                return self.decode(values), None
            except Exception as error:  # the user's decoder refused this entry: quarantined, not fatal
                return None, f"decode failed: {type(error).__name__}: {error}"
        if self.fields is None:
            items = list(values.items())
        else:
            missing = [f for f in self.fields if f.encode() not in values]
            if missing:
                return None, (f"has no field {missing[0]!r} (expected fields {list(self.fields)}; "
                              f"received {[_text(k) for k in values]})")
            items = [(f.encode(), values[f.encode()]) for f in self.fields]
        parsed = []
        for key, value in items:
            try:
                parsed.append(number(value))
            except ValueError:
                return None, f"field {_text(key)!r} = {value!r} is not a number (pass decode= for other encodings)"
        if self.fields is None:
            return {_text(k): v for (k, _), v in zip(items, parsed)}, None
        return tuple(parsed), None

    def quarantine(self, letters: Sequence[DeadLetter]) -> None:
        """``XADD`` each letter to the dead-letter stream: the entry's own fields, and ``batchfit.id`` (its id in
        the stream), ``batchfit.reason``, ``batchfit.stream``, ``batchfit.group`` and ``batchfit.consumer``."""
        if not letters or self.dead_letters is None:
            return
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for fields in entries:
                pipe.xadd(dead, fields)
            pipe.execute()

        dead = self.dead_letters
        entries = []
        for letter in letters:
            fields: dict[Any, Any] = dict(letter.raw) if isinstance(letter.raw, Mapping) else {}
            fields.update({"batchfit.id": _text(letter.id), "batchfit.reason": letter.reason,
                           "batchfit.stream": self.stream, "batchfit.group": self.group,
                           "batchfit.consumer": self.consumer})
            entries.append(fields)
        self._do(f"XADD to the dead-letter stream {dead!r}", write)


def _delivered_since(then: Any, now: Any) -> int | None:
    """Entries the group was delivered between two of its ``entries-read`` counters (``None``: unknown)."""
    if isinstance(then, int) and isinstance(now, int) and now >= then:
        return now - then
    return None


def _order(event_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (``"1700000000000-3"`` -> ``(1700000000000, 3)``)."""
    ms, _, seq = str(event_id).partition("-")
    return int(ms), int(seq or 0)


def _client_url(client: Any) -> str:
    """Where a ``redis.Redis`` client connects, as a URL without its password."""
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:
        return type(client).__name__
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
