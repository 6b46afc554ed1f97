"""Redis Streams as a stage input: the stream operations the ``redis`` backend is made of.

Discussion. procd does not invent a cluster of its own: a stage input is one stream
(``procd:<pipeline>:<stage>``) read through one consumer group (named after the stage), and
every worker on every host is one consumer of it. What each piece of the transport contract
becomes:

- send: ``XADD`` of one entry per batch (fields ``n``, the item count, and ``b``, the encoded
  batch). Backpressure comes from the group's ``lag`` (entries not yet delivered, Redis 7's
  ``XINFO GROUPS``): a writer blocks while the backlog is at the bound. It reads the lag only
  when it has used up the credit the last reading gave it, and then in the same round trip as
  the entry that used it up: a writer whose readers keep up pays no round trip of its own for
  the bound. Never ``MAXLEN``: trimming drops unread entries.
- receive / hold / acknowledge: ``XREADGROUP ... >`` hands an entry to one consumer and keeps it
  in the group's pending list until ``XACK``; the acknowledgement also ``XDEL``s it (both in one
  ``MULTI``), so the stream does not grow without bound. The entry id is the delivery id the
  slot holds. A reader sends the acknowledgement of the batch it handed on in the same pipeline
  as its next ``XREADGROUP`` (and the writers' count, ``HLEN``): one round trip per batch.
- a worker killed holding an entry: its slot's next process ``XCLAIM``s that id first; a host
  that died: the entries its consumers held stay pending, and any other consumer takes them with
  ``XAUTOCLAIM`` once they have been idle ``claim_after``. Redis counts every delivery
  (``times_delivered``), so attempts are counted wherever the entry crashed a worker.
- end of stream across hosts: every supervisor that runs an upstream stage registers itself as a
  writer (a hash field whose value is an expiry time, renewed by a heartbeat) and removes the
  field when that stage has finished on its host. The input has ended once every upstream stage
  has been seen and none has a live writer, and nothing is left in the backlog or pending; the
  first supervisor to see that sets the ``ended`` key. A reader looks at all this when a read
  finds nothing and no writer is registered (while one is, only now and then, to clear away a
  host that died without deregistering: it counts as gone when its expiry passes). A supervisor
  that deregisters wakes the readers blocked in a read (``CLIENT UNBLOCK`` of the client ids
  they registered), so that they look at once.

Every call here can raise ``redis.exceptions.ConnectionError`` (or ``TimeoutError``); retrying
with backoff and telling the operator is the caller's decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

# How long one blocking read waits before the reader looks at its stop descriptor again (an idle
# reader costs Redis one pipeline per read: it looks whether the input has ended only now and
# then while writers are registered).
READ_BLOCK_MS = 100


def connect(url: str, *, timeout_s: float = 5.0) -> redis.Redis:
    """A client for ``url`` (not yet connected: the first command connects)."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


@dataclass(frozen=True)
class Entry:
    """One delivered batch: its id, its encoded items, and how often Redis has delivered it."""

    id: str
    payload: bytes
    count: int
    deliveries: int


@dataclass(frozen=True)
class Names:
    """The keys of one stage input."""

    stream: str
    group: str

    @property
    def writers(self) -> str:
        return f"{self.stream}:writers"

    @property
    def seen(self) -> str:
        return f"{self.stream}:seen"

    @property
    def ended(self) -> str:
        return f"{self.stream}:ended"

    @property
    def readers(self) -> str:
        """Reader slot (host, group, index) -> the client id its blocking reads come from."""
        return f"{self.stream}:readers"


def _entry(raw_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> Entry:
    return Entry(raw_id.decode(), fields[b"b"], int(fields[b"n"]), deliveries)


class Stream:
    """One stage input on one Redis server, as seen by one process."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        # redis-py types every reply as a union of all reply types; the shapes this module reads
        # are those of Redis 7 with bytes replies (checked by tests/test_redis_stream.py)
        self.client: Any = client
        self.names = names
        self._credit = 0
        self.writers_left = True  # the last read found a writer registered (it may have expired)
        self.writers_seen = True  # the last look at the end found every upstream stage seen

    # -- set-up ----------------------------------------------------------------------------------

    def create(self) -> None:
        """Make the stream and its group if they are not there (entries an earlier run left are
        kept: they are read again)."""
        try:
            self.client.xgroup_create(self.names.stream, self.names.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- writing ---------------------------------------------------------------------------------

    def backlog(self) -> tuple[int, int]:
        """(entries not yet delivered, entries delivered and not yet acknowledged)."""
        return self._backlog(self.client.xinfo_groups(self.names.stream))

    def _backlog(self, groups: list[dict[str, Any]]) -> tuple[int, int]:
        """The backlog of this input's group, from an ``XINFO GROUPS`` reply."""
        for group in groups:
            if group["name"].decode() == self.names.group:
                lag = group["lag"]
                if lag is None:  # Redis cannot tell (entries deleted out of order): count instead
                    lag = max(0, self.client.xlen(self.names.stream) - group["pending"])
                return int(lag), int(group["pending"])
        return 0, 0

    def send(self, payloads: list[tuple[bytes, int]], bound: int, stop: Any = None) -> None:
        """Append each (payload, item count) as one entry, blocking while ``bound`` entries wait.

        The lag is read again in the same round trip as the entries that use up the credit the
        last reading gave, so a writer whose readers keep up never waits for it on its own.

        Args:
            stop: optional callable; while blocked, ``stop()`` returning True ends the wait
                with ``InterruptedError``.
        """
        pause = 0.0005
        start = 0
        while start < len(payloads):
            if self._credit <= 0:
                lag, _pending = self.backlog()
                self._credit = bound - lag
                if self._credit <= 0:
                    if stop is not None and stop():
                        raise InterruptedError("stopped while the queue was full")
                    # Redis cannot say when the lag falls: look again soon (a full queue is one
                    # whose readers are busy, so a look every few ms costs them nothing)
                    time.sleep(pause)
                    pause = min(pause * 2, 0.005)
                    continue
                pause = 0.0005
            chunk = payloads[start : start + self._credit]
            self._credit -= len(chunk)
            start += len(chunk)
            pipe = self.client.pipeline(transaction=False)
            for payload, count in chunk:
                pipe.xadd(self.names.stream, {"n": count, "b": payload})
            if self._credit <= 0:
                pipe.xinfo_groups(self.names.stream)
            replies = pipe.execute()
            if self._credit <= 0:
                lag, _pending = self._backlog(replies[-1])
                self._credit = bound - lag

    # -- reading ---------------------------------------------------------------------------------

    def read(self, consumer: str, block_ms: int | None = None, acknowledge: tuple[str, ...] = ()) -> Entry | None:
        """The next entry no consumer has had, or None when none came within ``block_ms``
        (default ``READ_BLOCK_MS``; 0: do not wait); ``writers_left`` then says whether a writer
        was registered when the read ended.

        Args:
            acknowledge: entries to acknowledge first, in the same round trip (a reader's last
                batch, handed on since).
        """
        if block_ms is None:
            block_ms = READ_BLOCK_MS
        pipe = self.client.pipeline(transaction=False)
        if acknowledge:
            self._acknowledge(pipe, acknowledge)
        pipe.xreadgroup(self.names.group, consumer, {self.names.stream: ">"}, count=1, block=block_ms or None)
        pipe.hlen(self.names.writers)  # after the read: a read that the end woke sees the end
        *_, found, writers = pipe.execute()
        self.writers_left = writers > 0
        for _stream, entries in found or ():
            for raw_id, fields in entries:
                if fields:  # an entry deleted after delivery comes back without fields
                    return _entry(raw_id, fields, 1)
        return None

    def register_reader(self, reader: str) -> None:
        """``reader`` (a worker slot) blocks in reads on this connection: ``wake_readers`` may
        cut such a read short."""
        self.client.hset(self.names.readers, reader, self.client.client_id())

    def forget_reader(self, reader: str) -> None:
        self.client.hdel(self.names.readers, reader)

    def wake_readers(self) -> int:
        """End every registered reader's blocking read now, as if it had timed out, so that it
        looks at once whether the input has ended (``CLIENT UNBLOCK``; a client id that has
        gone, or a read that is not blocked, is left alone).

        Returns:
            How many reads were cut short.

        Raises:
            redis.ResponseError: the login may not use ``CLIENT UNBLOCK`` (the readers then
                see the end when their reads time out).
        """
        ids = self.client.hvals(self.names.readers)
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for client_id in ids:
            pipe.client_unblock(int(client_id))
        return sum(map(int, pipe.execute()))

    def claim(self, consumer: str, entry_id: str) -> Entry | None:
        """Take over entry ``entry_id`` (the one this slot's previous process held)."""
        claimed = self.client.xclaim(
            self.names.stream, self.names.group, consumer, min_idle_time=0, message_ids=[entry_id]
        )
        for raw_id, fields in claimed:
            if fields:
                return _entry(raw_id, fields, self._deliveries(raw_id))
        return None

    def claim_idle(self, consumer: str, idle_ms: int) -> Entry | None:
        """Take over one entry that another consumer has held silently for ``idle_ms``."""
        result = self.client.xautoclaim(
            self.names.stream, self.names.group, consumer, min_idle_time=idle_ms, start_id="0-0", count=1
        )
        for raw_id, fields in result[1]:
            if fields:
                return _entry(raw_id, fields, self._deliveries(raw_id))
        return None

    def claim_pending_of(self, dead: str, consumer: str) -> Entry | None:
        """Take over one entry that consumer ``dead`` was handed and never acknowledged; forget
        ``dead`` once it holds nothing more (deleting a consumer drops what it holds)."""
        pending = self.client.xpending_range(
            self.names.stream, self.names.group, min="-", max="+", count=2, consumername=dead
        )
        entry = self.claim(consumer, pending[0]["message_id"].decode()) if pending else None
        if len(pending) < 2:
            self.client.xgroup_delconsumer(self.names.stream, self.names.group, dead)
        return entry

    def _deliveries(self, raw_id: bytes) -> int:
        pending = self.client.xpending_range(self.names.stream, self.names.group, min=raw_id, max=raw_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 1

    def acknowledge(self, *entry_ids: str) -> None:
        """The entries are handled: out of the pending list and out of the stream."""
        pipe = self.client.pipeline(transaction=False)
        self._acknowledge(pipe, entry_ids)
        pipe.execute()

    def _acknowledge(self, pipe: Any, entry_ids: tuple[str, ...]) -> None:
        """Queue XACK and XDEL of ``entry_ids`` on ``pipe``, as one transaction: an entry is never
        acknowledged and left in the stream (``MULTI`` inside a plain pipeline, so that a blocking
        read can follow in the same round trip; ``EXEC``'s reply is read raw)."""
        pipe.execute_command("MULTI")
        pipe.execute_command("XACK", self.names.stream, self.names.group, *entry_ids)
        pipe.execute_command("XDEL", self.names.stream, *entry_ids)
        pipe.execute_command("EXEC")

    # -- end of stream ---------------------------------------------------------------------------

    def register(self, writer: str, upstream: str, ttl_s: float) -> None:
        """``writer`` (a supervisor running stage ``upstream``) writes to this input; it counts
        as gone ``ttl_s`` after its last heartbeat."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.names.writers, f"{upstream}@{writer}", time.time() + ttl_s)
        pipe.sadd(self.names.seen, upstream)
        pipe.delete(self.names.ended)  # a live writer: whatever an earlier run decided is over
        pipe.execute()

    heartbeat = register

    def deregister(self, writer: str, upstream: str) -> None:
        """Stage ``upstream`` has finished on ``writer``'s host."""
        self.client.hdel(self.names.writers, f"{upstream}@{writer}")

    def check_ended(self, upstreams: list[str], ttl_s: float, since: float = 0.0) -> bool:
        """Whether this input has ended for good. The first to see it says so in the ``ended``
        key (with Redis's clock, kept ``ttl_s``, long enough for every host's readers to see it)
        and forgets which writers it saw, so that a later run waits for its own writers; an end
        said before ``since`` (when this reader's supervisor made the input) is an earlier run's.
        """
        if self.ended(since):
            return True
        seen = {name.decode() for name in self.client.smembers(self.names.seen)}
        self.writers_seen = set(upstreams) <= seen
        if not self.writers_seen:
            return False
        now = time.time()
        for field, expiry in self.client.hgetall(self.names.writers).items():
            if float(expiry) > now:
                return False
            self.client.hdel(self.names.writers, field)  # a host that died without saying so
        self.writers_left = False
        lag, pending = self.backlog()
        if lag or pending:
            return False
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.names.ended, self.server_time(), ex=max(1, round(ttl_s)))
        pipe.delete(self.names.seen)
        pipe.execute()
        return True

    def ended(self, since: float = 0.0) -> bool:
        """An end was said at ``since`` or later (and has not expired)."""
        said = self.client.get(self.names.ended)
        return said is not None and float(said) >= since

    def server_time(self) -> float:
        """Redis's clock (one clock for every host), in seconds."""
        seconds, microseconds = self.client.time()
        return float(seconds) + float(microseconds) / 1e6
