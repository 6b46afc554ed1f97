"""The transport seam: how batches of items travel from the processes of one stage to those of the
next. Everything above this package (the supervisor, the worker runtime, ``dlq replay``,
checkpoints) uses only what this module declares.

A stage input is an ``Input`` (the supervisor's side): it is created once, hands every worker an
``Endpoint`` (a picklable description, rebuilt in the worker after fork, spawn or forkserver),
ends the stream, reports its depth, gives back the capacity a killed process may have held, and
names the processes that still hold its writing end. From an endpoint a worker opens a ``Writer``
(``send`` blocks while the input is full: backpressure) or a ``Reader`` (``receive`` / ``held``
/ ``done``: a batch stays held in the worker's slot until ``done``, and a batch a killed
predecessor held is handed to the slot's next process by ``held``).

Discussion. The supervisor never unpickles an item and never imports stage code: what it must
know about a held batch (whether there is one, its item count, the item in hand, how often it was
delivered) and about a dead process's share of a queue's capacity is in the slot file's header
(``slot``), written by the worker as plain numbers. A backend's acknowledgement, depth and
"blocked" are its own affair (a row deleted, a stream entry acknowledged, an eventfd read): the
interface says only what they mean. A batch is identified by whatever the backend receives into
the slot: a whole pickle, the name of a spilled file, a row id; a networked backend would receive
its stream entry id there.

Backends (``queue.backend`` in the pipeline file → module here):

- ``memory`` → ``local``: a socket pair, an eventfd and spill files; fast, no server.
- ``sqlite`` → ``sqlite``: rows in a SQLite file, durable across a restart of procd itself.
- ``redis`` → ``streams``: a Redis stream read through a consumer group, shared by procd daemons on
  several hosts (``redisstream`` holds the stream operations).

Adding a backend means one module here that subclasses these three classes, one line in
``_BACKENDS``, and its name in the config schema (``config.BACKENDS``); nothing else changes.
"""

from __future__ import annotations

import abc
import importlib
import pickle
import select
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from procd import signals
from procd.config import QueueSpec
from procd.transport.slot import SlotFile

_BACKENDS = {"memory": "local", "sqlite": "sqlite", "redis": "streams"}


class Interrupted(Exception):
    """A wait in ``Reader.receive`` ended because its stop descriptor became readable."""


@dataclass(frozen=True)
class Held:
    """A batch that the slot's previous process held when it ended (worker side)."""

    items: list[Any]
    index: int  # the item in hand when a redelivered batch killed a process, else -1
    crashes: int  # the processes it is charged with having killed (see worker.redelivery)
    deliveries: int  # deliveries of this batch so far
    last_signal: int  # how the last process ended (-1: not by a signal)
    last_code: int


class EncodeError(Exception):
    """A writer's codec cannot encode one item of a batch; nothing of the batch was sent.

    ``index`` is the item's place in the batch, ``cause`` the codec's own exception.
    """

    def __init__(self, index: int, cause: Exception) -> None:
        super().__init__(f"item {index} of the batch cannot be encoded: {type(cause).__name__}: {cause}")
        self.index = index
        self.cause = cause


class Writer(abc.ABC):
    """The sending side of one input, in an upstream worker.

    Sending is two steps, so that a worker can encode a batch for every output before it sends
    it to any (fan-out: an item no output can take is then set aside whole, see
    ``child.Outlet``): ``encode`` in the backend's codec (pickle; JSON for a networked backend),
    which names the item it cannot encode, then ``send_encoded``. ``send`` does both.
    """

    @abc.abstractmethod
    def encode(self, items: list[Any]) -> bytes:
        """``items`` as one batch in this writer's codec.

        Raises:
            EncodeError: an item cannot be encoded (the first such, by its index).
        """

    @abc.abstractmethod
    def send_encoded(self, count: int, payload: bytes) -> None:
        """Send a batch of ``count`` items that ``encode`` made; blocks while the input is full."""

    def send(self, items: list[Any]) -> None:
        """Send ``items`` as one batch; blocks while the input is full.

        Raises:
            EncodeError: an item cannot be encoded; nothing was sent.
        """
        self.send_encoded(len(items), self.encode(items))

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of the input (the end of stream counts writers that have let go)."""


class Reader(abc.ABC):
    """The receiving side of one input, in a worker of the stage."""

    at_end = False  # ``batches`` or iteration has received the end of stream

    @abc.abstractmethod
    def receive(self, stop_fd: int | None = None) -> list[Any] | None:
        """Return the next batch (held in the slot until ``done``), or None at end of stream.

        Args:
            stop_fd: while waiting, also watch this descriptor; when it becomes readable the wait
                ends and ``Interrupted`` is raised with nothing taken from the input.
        """

    @abc.abstractmethod
    def held(self) -> Held | None:
        """The batch the slot's previous process held when it ended, now held by this one
        (delivered once more), or None."""

    @abc.abstractmethod
    def done(self) -> None:
        """Every output of the batch in hand has been handed on: acknowledge it."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def batches(self, stop_fd: int) -> Iterator[list[Any]]:
        """Every batch until the end of stream. A worker asked to leave (SIGTERM: see
        ``signals.stop_fd_on_sigterm``) takes no further batch, however full its input; one
        waiting for input also ends quietly when ``stop_fd`` becomes readable."""
        while True:
            if signals.terminated():
                return
            try:
                batch = self.receive(stop_fd)
            except Interrupted:
                return
            if batch is None:
                self.at_end = True
                return
            yield batch

    def __iter__(self) -> Iterator[list[Any]]:
        while (batch := self.receive()) is not None:
            yield batch
        self.at_end = True


@dataclass(frozen=True)
class Endpoint(abc.ABC):
    """One input as a worker gets it: plain data (it crosses ``exec``); descriptors by number
    (``spawn`` and the fork server put them back at the same numbers)."""

    @property
    def durable(self) -> bool:
        """Items written survive a restart of procd (a checkpoint needs every reader durable)."""
        return False

    @abc.abstractmethod
    def reader_fds(self) -> set[int]:
        """Descriptors a reading worker keeps (never the writing end: the end of stream needs it
        closed)."""

    @abc.abstractmethod
    def writer_fds(self) -> set[int]:
        """Descriptors a writing worker keeps."""

    @abc.abstractmethod
    def writer(self, slot: SlotFile | None = None, token: int = 0) -> Writer:
        """A writer; ``slot`` (with the output's number, ``token``, among the worker's outputs)
        lets the supervisor give back capacity this process held if it is killed mid-send."""

    @abc.abstractmethod
    def reader(self, slot: SlotFile | None = None, *, keep_batch: bool = True, worker: int = 0) -> Reader:
        """A reader; with ``keep_batch`` each batch is received into ``slot`` and held there until
        ``done`` (at-least-once), else only the capacity is tracked there. ``worker`` is the
        reading worker's index in its stage (a shared backend names its consumer with it)."""


@dataclass(eq=False)
class Input(abc.ABC):
    """One stage input as the supervisor sees it, and which live processes hold which of its ends.

    A stage has one current input; a reload that replaces it retires the old one, which its
    readers drain while its last writers end.
    """

    stage: str
    spec: QueueSpec
    current: bool = True
    writers: set[int] = field(default_factory=set)  # pids of live processes that hold the writing end
    readers: set[int] = field(default_factory=set)

    @property
    @abc.abstractmethod
    def ended(self) -> bool:
        """The end of stream has been given: no new writer will ever get this input."""

    @abc.abstractmethod
    def endpoint(self) -> Endpoint: ...

    @abc.abstractmethod
    def end(self) -> None:
        """End the stream: readers see the end once every writer has let go."""

    @abc.abstractmethod
    def depth(self) -> int | None:
        """Batches waiting; None when it cannot be known."""

    @abc.abstractmethod
    def reclaim(self) -> None:
        """Give back the unit of capacity a dead process's slot says it may have held."""

    @abc.abstractmethod
    def attach(self) -> tuple[dict[str, Any], tuple[int, ...]]:
        """A writer's endpoint for a client outside the pipeline (``procd dlq replay``): JSON
        fields and descriptors, for ``attached_writer``."""

    @abc.abstractmethod
    def holders(self) -> list[int]:
        """Pids of processes that still hold the writing end (after ``end``)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def drained(self) -> bool:
        """A retired input that nobody holds any more."""
        return not self.current and self.ended and not self.readers

    # A backend shared by several hosts (redis) needs the next three; the local ones do not.

    def housekeeping_s(self) -> float | None:
        """How often ``housekeep`` must run; None: never."""
        return None

    def write_from(self, upstreams: list[str]) -> None:  # noqa: B027 (a no-op unless overridden)
        """This supervisor runs these upstream stages: the end of stream waits for them here.

        Raises:
            Unavailable: the backend's server cannot be reached now.
        """

    def housekeep(self) -> None:  # noqa: B027 (a no-op unless overridden)
        """Periodic upkeep (a shared backend's heartbeat).

        Raises:
            Unavailable: the backend's server cannot be reached now.
        """


class Unavailable(Exception):
    """A networked backend's server cannot be reached (or refused us); the message says which
    and where, without credentials. ``final`` is True when retrying cannot help (a refused
    login)."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


def _backend(name: str) -> Any:
    try:
        return importlib.import_module(f"procd.transport.{_BACKENDS[name]}")
    except KeyError:
        raise ValueError(f"unknown queue backend {name!r}; backends are {', '.join(_BACKENDS)}") from None


def create(stage: str, spec: QueueSpec) -> Input:
    """Create the input of ``stage`` (a backend's module is imported only when a queue uses it).

    Raises:
        StoreError: a durable input's storage cannot be used.
        Unavailable: a shared backend's server cannot be reached.
    """
    made: Input = _backend(spec.backend).create(stage, spec)
    return made


def attached_writer(fields: dict[str, Any], fds: list[int]) -> Writer:
    """Rebuild a writer from an ``Input.attach`` reply and the descriptors that came with it."""
    writer: Writer = _backend(str(fields.get("backend"))).attached_writer(fields, fds)
    return writer


def encoded(items: list[Any], encode: Callable[[list[Any]], bytes]) -> bytes:
    """``encode(items)``; when that fails, the failure of the first item that cannot be encoded
    on its own (found only then: the normal path encodes once).

    Raises:
        EncodeError: naming that item.
    """
    try:
        return encode(items)
    except Exception:
        for index, item in enumerate(items):
            try:
                encode([item])
            except Exception as cause:
                raise EncodeError(index, cause) from None
        raise  # every item encodes alone: not an item's fault


def pickled(items: list[Any]) -> bytes:
    """The batch as a pickle (the local and SQLite backends' codec).

    Raises:
        EncodeError: an item cannot be pickled.
    """
    return encoded(items, _pickle)


def _pickle(items: list[Any]) -> bytes:
    return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)


def wait_readable(fd: int, stop_fd: int | None) -> None:
    """Block until ``fd`` is readable; raise ``Interrupted`` if ``stop_fd`` became readable."""
    watched = [fd] if stop_fd is None else [fd, stop_fd]
    ready, _, _ = select.select(watched, [], [])
    if stop_fd is not None and stop_fd in ready:
        raise Interrupted
