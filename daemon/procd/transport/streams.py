"""The Redis Streams backend (``queue = { backend = "redis", url = "redis://..." }``): a stage
input that procd daemons on several hosts share.

Discussion. The stream operations are ``redisstream``'s; this module fits them to the transport
interface. What differs from the local backends:

- No descriptors: an endpoint is the server's URL and the stream's names, and every process opens
  its own connection (a connection must not cross ``fork``).
- The slot file holds the entry id (message kind ``ENTRY``), so a killed reader's entry is
  claimed by the slot's next process at once (``XCLAIM``); an entry whose consumer went silent
  for ``claim_after`` (its host died) is taken by any reader on any host (``XAUTOCLAIM``).
  ``done`` does not wait for Redis: the acknowledgement goes with the next read, in its round
  trip, and until then the slot names the consumer (message kind ``READING``), so a process
  killed in between leaves the entry to the slot's next process, which delivers it again (as
  when a kill lands just before an acknowledgement). A reader told to stop acknowledges first.
- The bound is the group's lag, which no dead process can hold: ``reclaim`` has nothing to do.
- End of stream is agreed through Redis: the supervisor registers itself as a writer for every
  upstream stage it runs and renews that with a heartbeat (``housekeep``); each writing process
  registers itself while it sends. A reader that finds nothing to read checks whether every
  upstream stage was seen, no writer is alive and nothing is left (``Stream.check_ended``). An
  end said before its supervisor made the input (Redis's clock, ``RedisEndpoint.since``) was an
  earlier run's: a host that starts before this run's writers waits for them.
- Items are encoded with the input's codec: JSON by default for Redis (any program can read it),
  pickle on request (it lets anyone who can write to that Redis run code in the workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pickle
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from procd.config import QueueSpec
from procd.config import redact_url as redact
from procd.transport import Endpoint, Held, Input, Interrupted, Reader, Unavailable, Writer, encoded
from procd.transport.redisstream import Entry, Names, Stream, connect
from procd.transport.slot import ENTRY, MESSAGE, NO_TOKEN, RUNNING, WAITING_INPUT, WAITING_OUTPUT, SlotFile

READING = b"r"[0]  # a slot message that is not a batch: the consumer name a process reads as

HOST = socket.gethostname()
# How often a reader with nothing to read looks for entries other consumers left idle.
_CLAIM_CHECKS_PER_WINDOW = 4
# How often a reader looks whether its input has ended while not every upstream stage has
# registered a writer yet (once they all have and none is left, it looks after every empty read).
_SEEN_CHECK_S = 0.1
# How long a reader whose writers have all gone waits between looks, while other readers finish
# the last entries.
_ENDING_PAUSE_S = 0.01


def encode(codec: str, items: list[Any]) -> bytes:
    """The batch in the input's codec.

    Raises:
        EncodeError: naming the first item the codec cannot take.
    """
    return encoded(items, functools.partial(_dumps, codec))


def _dumps(codec: str, items: list[Any]) -> bytes:
    if codec == "json":
        return json.dumps(items, separators=(",", ":"), allow_nan=False).encode()
    return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)


def decode(codec: str, payload: bytes) -> list[Any]:
    items: list[Any] = json.loads(payload) if codec == "json" else pickle.loads(payload)
    return items


@dataclass(frozen=True)
class RedisEndpoint(Endpoint):
    url: str
    stream: str
    group: str
    codec: str
    claim_after_s: float
    slots: int
    upstream: tuple[str, ...]
    since: float = 0.0  # Redis's clock when the supervisor made the input: an earlier end is stale

    @property
    def durable(self) -> bool:
        return True

    @property
    def names(self) -> Names:
        return Names(self.stream, self.group)

    def reader_fds(self) -> set[int]:
        return set()

    def writer_fds(self) -> set[int]:
        return set()

    def writer(self, slot: SlotFile | None = None, token: int = 0) -> Writer:
        return RedisWriter(self, slot)

    def reader(self, slot: SlotFile | None = None, *, keep_batch: bool = True, worker: int = 0) -> Reader:
        return RedisReader(self, slot if keep_batch else None, worker)

    def __repr__(self) -> str:  # the URL may carry a password
        return f"RedisEndpoint({redact(self.url)!r}, stream={self.stream!r})"


@dataclass(eq=False)
class RedisInput(Input):
    endpoint_: RedisEndpoint | None = None
    client: Any = None
    registered: list[str] = field(default_factory=list)  # upstream stages this supervisor writes for
    writing: bool = True

    @property
    def ended(self) -> bool:
        return not self.writing

    def endpoint(self) -> RedisEndpoint:
        assert self.endpoint_ is not None
        return self.endpoint_

    @property
    def _stream(self) -> Stream:
        return Stream(self.client, self.endpoint().names)

    def housekeeping_s(self) -> float:
        """How often ``housekeep`` must run: a third of the time a silent writer counts as alive."""
        return self.endpoint().claim_after_s / 3

    def write_from(self, upstreams: list[str]) -> None:
        self.registered = list(upstreams)
        self.housekeep()

    def housekeep(self) -> None:
        """Renew this supervisor's writer registrations (the heartbeat)."""
        with _unavailable_as(self.endpoint().url):
            for upstream in self.registered:
                self._stream.register(_supervisor_id(), upstream, self.endpoint().claim_after_s)

    def end(self) -> None:
        if self.writing:
            self.writing = False
            for upstream in self.registered:
                try:
                    self._stream.deregister(_supervisor_id(), upstream)
                except redis.RedisError:
                    pass  # it expires after claim_after all the same
            self.registered = []
            with contextlib.suppress(redis.RedisError):  # else they see it when their reads time out
                self._stream.wake_readers()

    def depth(self) -> int | None:
        try:
            lag, pending = self._stream.backlog()
        except redis.RedisError:
            return None
        return lag + pending

    def reclaim(self) -> None:
        """Nothing to give back: the bound is the group's lag, which no process holds."""

    def attach(self) -> tuple[dict[str, Any], tuple[int, ...]]:
        endpoint = self.endpoint()
        fields = {
            "backend": "redis",
            "url": endpoint.url,
            "stream": endpoint.stream,
            "group": endpoint.group,
            "codec": endpoint.codec,
            "claim_after_s": endpoint.claim_after_s,
            "slots": endpoint.slots,
            "upstream": list(endpoint.upstream),
            "since": endpoint.since,
        }
        return fields, ()

    def holders(self) -> list[int]:
        return []

    def close(self) -> None:
        self.end()
        self.client.close()


class _TryAgain(Exception):
    """Nothing arrived this time; the reader looks again after ``wait_s``."""

    def __init__(self, wait_s: float = 0.0) -> None:
        super().__init__(wait_s)
        self.wait_s = wait_s


def _patiently(call: Any) -> Any:
    """``call()``, retried with backoff while the server cannot be reached (a worker waits for
    Redis to come back; the supervisor says that it is away)."""
    pause = 0.05
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _supervisor_id() -> str:
    return f"{HOST}:{os.getpid()}"


def create(stage: str, spec: QueueSpec) -> RedisInput:
    """Make the stream and its group, and register this supervisor as a writer for every upstream
    stage (each host that runs one of them does the same).

    Raises:
        redis.RedisError: the server cannot be reached or refused the login.
    """
    assert spec.url is not None
    endpoint = RedisEndpoint(
        spec.url,
        spec.stream or f"procd:{stage}",
        stage,
        spec.codec,
        spec.claim_after_s,
        spec.slots,
        spec.upstream,
    )
    client = connect(spec.url)
    made = RedisInput(stage, spec, endpoint_=endpoint, client=client)
    try:
        with _unavailable_as(spec.url):
            made._stream.create()
            made.endpoint_ = dataclasses.replace(endpoint, since=made._stream.server_time())
    except BaseException:
        client.close()
        raise
    return made


@contextlib.contextmanager
def _unavailable_as(url: str) -> Iterator[None]:
    """Turn the client's connection and login errors into ``transport.Unavailable``."""
    where = redact(url)
    try:
        yield
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as error:
        raise Unavailable(f"Redis at {where} refused the login: {error}", final=True) from None
    except redis.ResponseError as error:
        if "NOAUTH" in str(error) or "WRONGPASS" in str(error):
            raise Unavailable(f"Redis at {where} refused the login: {error}", final=True) from None
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        raise Unavailable(f"Redis at {where} cannot be reached: {error}") from None


def attached_writer(fields: dict[str, Any], fds: list[int]) -> Writer:
    endpoint = RedisEndpoint(
        str(fields["url"]),
        str(fields["stream"]),
        str(fields["group"]),
        str(fields["codec"]),
        float(fields["claim_after_s"]),
        int(fields["slots"]),
        tuple(fields["upstream"]),
        float(fields.get("since", 0.0)),
    )
    return RedisWriter(endpoint, None)


class RedisWriter(Writer):
    """Appends batches as entries; registered as a live writer while it sends."""

    def __init__(self, endpoint: RedisEndpoint, slot: SlotFile | None) -> None:
        self._endpoint = endpoint
        self._slot = slot
        self._client = connect(endpoint.url)
        self._stream = Stream(self._client, endpoint.names)
        self._me = f"{HOST}:{os.getpid()}"
        self._renewed = 0.0

    def encode(self, items: list[Any]) -> bytes:
        return encode(self._endpoint.codec, items)

    def send_encoded(self, count: int, payload: bytes) -> None:
        now = time.monotonic()
        if now - self._renewed > self._endpoint.claim_after_s / 3:
            _patiently(lambda: self._stream.register(self._me, "writer", self._endpoint.claim_after_s))
            self._renewed = now
        slot = self._slot

        def waiting() -> bool:
            if slot is not None:
                slot.output_token(NO_TOKEN, WAITING_OUTPUT)
            return False

        _patiently(lambda: self._stream.send([(payload, count)], self._endpoint.slots, stop=waiting))
        if slot is not None:
            slot.output_token(NO_TOKEN, RUNNING)

    def close(self) -> None:
        if self._renewed:
            try:
                self._stream.deregister(self._me, "writer")
            except redis.RedisError:
                pass
        self._client.close()


class RedisReader(Reader):
    """Reads entries for one consumer (host, pid, stage, worker index) and keeps the one in hand
    in the slot."""

    def __init__(self, endpoint: RedisEndpoint, slot: SlotFile | None, worker: int = 0) -> None:
        self._endpoint = endpoint
        self._slot = slot
        self._client = connect(endpoint.url)
        self._stream = Stream(self._client, endpoint.names)
        self._consumer = f"{HOST}:{os.getpid()}:{endpoint.group}:{worker}"
        self._place = f"{HOST}:{endpoint.group}:{worker}"  # the slot's, whichever process is in it
        self._registered = False  # as a reader that ``wake_readers`` may wake
        self._entry = ""  # the id of the entry in hand
        self._handled: list[str] = []  # entries handed on, acknowledged with the next read
        self._next_claim = 0.0
        self._next_end_check = 0.0  # while writers are registered, look at the end only this often
        self._busy = True  # the last read brought an entry (or none was made yet)

    def receive(self, stop_fd: int | None = None) -> list[Any] | None:
        pause = 0.05
        while True:
            if stop_fd is not None and select.select([stop_fd], [], [], 0)[0]:
                self._acknowledge_once()  # the worker stops here: what it handed on must not wait
                raise Interrupted
            try:
                return self._receive()
            except _TryAgain as again:
                pause = 0.05
                if again.wait_s and stop_fd is not None:
                    select.select([stop_fd], [], [], again.wait_s)
                elif again.wait_s:
                    time.sleep(again.wait_s)
            except (redis.ConnectionError, redis.TimeoutError):  # the server is away: wait for it
                self._registered = False  # a new connection has a new client id
                if stop_fd is not None and select.select([stop_fd], [], [], pause)[0]:
                    raise Interrupted from None
                if stop_fd is None:
                    time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _receive(self) -> list[Any] | None:
        """One try: an entry, None at the end of stream, or ``_TryAgain``."""
        endpoint, stream = self._endpoint, self._stream
        claim_ms = int(endpoint.claim_after_s * 1000)
        entry = None
        now = time.monotonic()
        if now >= self._next_claim:
            entry = stream.claim_idle(self._consumer, claim_ms)
            if entry is None:
                self._next_claim = now + endpoint.claim_after_s / _CLAIM_CHECKS_PER_WINDOW
            elif self._handled:  # no read follows, and the slot is about to name the claimed one
                self._acknowledge_once()
        if entry is None:
            if not self._registered:
                stream.register_reader(self._place)
                self._registered = True
            self._mark_reading()
            # A read that finds nothing waits (blocks) only while writers are registered, and
            # Redis's writers' count comes after the read: so, right after a batch, a look that
            # does not wait comes first, and the count it brings says whether to wait at all
            # (the last writer may have left, and woken the blocked readers, while this one was
            # busy). Redis ends a blocked read late when idle (100 ms at its default hz = 10).
            ending = stream.writers_seen and not stream.writers_left
            handled = tuple(self._handled)
            entry = stream.read(self._consumer, 0 if self._busy or ending else None, acknowledge=handled)
            self._handled.clear()
            if entry is None and self._busy and stream.writers_left:
                entry = stream.read(self._consumer)
            self._busy = entry is not None
        if entry is None:
            if now < self._next_end_check and (stream.writers_left or not stream.writers_seen):
                raise _TryAgain  # a writer may still send, or none has come yet: look later
            if stream.check_ended(list(endpoint.upstream), endpoint.claim_after_s, endpoint.since):
                if self._slot is not None:
                    self._slot.disarm()
                return None
            # with writers registered, look now and then all the same: one that died without
            # saying so stays registered until a look clears it
            wait_s = endpoint.claim_after_s / _CLAIM_CHECKS_PER_WINDOW if stream.writers_left else _SEEN_CHECK_S
            self._next_end_check = now + wait_s
            ending = stream.writers_seen and not stream.writers_left
            raise _TryAgain(_ENDING_PAUSE_S if ending else 0.0)  # other readers finish the backlog
        self._hold(entry.id, entry.count, entry.deliveries)
        return decode(endpoint.codec, entry.payload)

    def _mark_reading(self) -> None:
        """Say in the slot which consumer is about to read: an entry Redis hands it is pending
        under that name from then on, and if this process is killed before it holds the entry,
        the slot's next process finds the name and claims the entry at once (not only another
        consumer after ``claim_after``)."""
        slot = self._slot
        if slot is None:
            return
        body = self._consumer.encode()
        slot.disarm(WAITING_INPUT)
        MESSAGE.pack_into(slot.buffer, 0, READING, 0, len(body))
        slot.buffer[MESSAGE.size : MESSAGE.size + len(body)] = body

    def _hold(self, entry_id: str, count: int, deliveries: int) -> None:
        self._entry = entry_id
        slot = self._slot
        if slot is None:
            return
        body = entry_id.encode()
        slot.arm()
        MESSAGE.pack_into(slot.buffer, 0, ENTRY, count, len(body))
        slot.buffer[MESSAGE.size : MESSAGE.size + len(body)] = body
        slot.hold(MESSAGE.size + len(body), deliveries)
        slot.input_token(False)  # no capacity to give back: the bound is the group's lag

    def held(self) -> Held | None:
        slot = self._slot
        if slot is None:
            return None
        header = slot.header()
        if header.holds and header.kind == ENTRY:
            entry = self._stream.claim(self._consumer, slot.message()[MESSAGE.size :].decode())
        else:
            entry = self._claim_from(self._reading_consumer())
        if entry is None:  # acknowledged just before its process was killed
            slot.clear()
            return None
        slot.hold(len(slot.message()), entry.deliveries)
        self._entry = entry.id
        items = decode(self._endpoint.codec, entry.payload)
        return Held(items, header.index, header.crashes, entry.deliveries - 1, header.last_signal, header.last_code)

    def _reading_consumer(self) -> str | None:
        """The consumer the slot's previous process was reading as, if it was killed reading."""
        assert self._slot is not None
        kind, _count, size = MESSAGE.unpack_from(self._slot.buffer, 0)
        if kind != READING or not 0 < size <= 1024:
            return None
        return bytes(self._slot.buffer[MESSAGE.size : MESSAGE.size + size]).decode(errors="replace")

    def _claim_from(self, consumer: str | None) -> Entry | None:
        """Claim what ``consumer`` (a killed process of this slot) had been handed, if anything;
        then hold it in the slot like a received batch."""
        if consumer is None or consumer == self._consumer:
            return None
        entry = self._stream.claim_pending_of(consumer, self._consumer)
        if entry is not None:
            self._hold(entry.id, entry.count, entry.deliveries)
        return entry

    def done(self) -> None:
        """The entry in hand is acknowledged with the next read, in its round trip. Until then
        the slot names this consumer as one that is about to read: if this process is killed
        first, the slot's next process claims what is still pending under that name (a batch
        handed on but not yet acknowledged is delivered again, as one whose process was killed
        just before an acknowledgement would be)."""
        if self._entry:
            self._handled.append(self._entry)
            self._entry = ""
        if self._slot is not None:
            self._mark_reading()

    def _acknowledge_once(self) -> None:
        """Acknowledge the entries handed on now, as no read will follow; if Redis cannot be
        reached, they stay pending under this consumer, which the slot names."""
        if self._handled:
            with contextlib.suppress(redis.RedisError):
                self._stream.acknowledge(*self._handled)
                self._handled.clear()

    def close(self) -> None:
        self._acknowledge_once()
        if self._registered:
            with contextlib.suppress(redis.RedisError):
                self._stream.forget_reader(self._place)
        if not self._entry and not self._handled:  # a consumer per worker process: forget it once it holds nothing
            try:
                self._client.xgroup_delconsumer(self._endpoint.stream, self._endpoint.group, self._consumer)
            except redis.RedisError:
                pass
        self._client.close()
