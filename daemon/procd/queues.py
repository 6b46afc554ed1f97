"""Queue transport between stages: bounded, atomic messages, no lock a dead process could hold.

Discussion. ``multiprocessing.Queue`` is ruled out: a reader killed while it holds the queue's
shared reader lock wedges every other reader forever, a killed reader can leave half a message in
the pipe, and the feeder thread loses items when a process exits without joining it.

The local transport is an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair per stage input. Every writer
(each process of each upstream stage) shares one end, every reader (each process of the stage)
shares the other. The kernel delivers each message whole to exactly one reader, and a process that
dies mid-call either sent (or received) a whole message or nothing: there is no user-space lock
to leave held. A message is one batch of pickled items.

The bound: an ``eventfd`` in semaphore mode counts free message slots (``ceil(maxsize / batch)``).
A writer takes a slot before it sends (blocking while the queue is full: backpressure), a reader
gives one back after each receive. The kernel's socket buffer is a second, byte-sized bound.

Large batches: the kernel builds a datagram beyond about 80 KiB from one physically contiguous
allocation, which fails (ENOBUFS) for megabytes. A batch that pickles to more than
``INLINE_LIMIT`` bytes is written to a ``memfd`` instead, and the message carries only that file
descriptor (``SCM_RIGHTS``), still one atomic message.

End of stream is the socket's own: once every copy of the writing end is closed (all upstream
processes have exited and the supervisor has dropped its copy), ``recv`` returns an empty message.

Only file descriptors cross ``fork``/``exec``; both sides rebuild their objects from the numbers.
"""

from __future__ import annotations

import array
import errno
import os
import pickle
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from procd import inflight

# The socket buffer (a byte bound besides the slot count): raised to this where the kernel allows
# it (root may exceed net.core.wmem_max with SO_SNDBUFFORCE). Linux doubles the value it is given.
_SNDBUF_BYTES = 4 * 1024 * 1024
# Larger payloads travel in a memfd (see the module docstring).
INLINE_LIMIT = 60 * 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
_ROW = struct.Struct("<q")  # a durable queue's doorbell: the row id
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


@dataclass(frozen=True)
class QueueFds:
    """The three descriptors of one queue, and the database of a durable one; picklable, so it
    can cross an exec."""

    write_fd: int
    read_fd: int
    slots_fd: int
    store_path: str | None = None


def create_queue(slots: int, store_path: str | None = None) -> QueueFds:
    """Create a queue that holds at most ``slots`` messages (durable with ``store_path``: see
    ``durable``; the rows an earlier run left are announced again, and count against the bound).

    Returns raw descriptors, close-on-exec; the caller decides who inherits which.

    Raises:
        StoreError: the durable queue's database cannot be used.
    """
    waiting: list[int] = []
    if store_path is not None:
        from procd import durable  # sqlite3 costs memory: only durable queues pay for it

        store = durable.Store(store_path, timeout_s=2.0)
        try:
            waiting = store.recover()
        finally:
            store.close()
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            writer.setsockopt(socket.SOL_SOCKET, option, _SNDBUF_BYTES)
            break
        except PermissionError:
            continue
    slots_fd = os.eventfd(max(0, slots - len(waiting)), os.EFD_SEMAPHORE | os.EFD_CLOEXEC)
    for row in waiting:  # the socket buffer holds far more doorbells than a queue has slots
        writer.send(_ROW.pack(row), socket.MSG_DONTWAIT)
    return QueueFds(writer.detach(), reader.detach(), slots_fd, store_path)


def close_fds(fds: tuple[int, ...]) -> None:
    """Close each descriptor, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class QueueWriter:
    """The sending side of one queue, used by an upstream worker."""

    def __init__(self, fds: QueueFds) -> None:
        self._sock = socket.socket(fileno=fds.write_fd)
        self._slots_fd = fds.slots_fd
        self._store_path = fds.store_path
        self._store: Any = None  # a durable.Store, opened on first send

    def send(self, items: list[Any]) -> None:
        """Send ``items`` as one message; blocks while the queue is full."""
        payload = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        while True:
            try:
                os.eventfd_read(self._slots_fd)
                break
            except InterruptedError:  # os.eventfd_read does not retry by itself (no PEP 475)
                continue
        if self._store_path is not None:
            if self._store is None:
                from procd import durable

                self._store = durable.Store(self._store_path)
            self._sock.send(_ROW.pack(self._store.insert(payload)))
            return
        if len(payload) <= INLINE_LIMIT:
            self._sock.send(payload)
            return
        memfd = os.memfd_create("procd-batch", os.MFD_CLOEXEC)
        try:
            with memoryview(payload) as view:
                written = 0
                while written < len(view):
                    written += os.write(memfd, view[written:])
            fds = array.array("i", [memfd])
            self._sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        finally:
            os.close(memfd)

    def close(self) -> None:
        self._sock.close()
        if self._store is not None:
            self._store.close()


class Interrupted(Exception):
    """A wait in ``QueueReader.receive`` ended because its stop descriptor became readable."""


class QueueReader:
    """The receiving side of one queue, used by a stage's workers.

    With an in-flight slot, each batch is received straight into it and stays marked held until
    ``done``; without one (tests, tools), into a private buffer.
    """

    def __init__(self, fds: QueueFds, slot: inflight.Slot | None = None) -> None:
        self._sock = socket.socket(fileno=fds.read_fd)
        self._slots_fd = fds.slots_fd
        self._slot = slot
        self._view = slot.buffer[: INLINE_LIMIT + 1] if slot is not None else memoryview(bytearray(INLINE_LIMIT + 1))
        self._store: Any = None  # a durable.Store for a durable queue
        if fds.store_path is not None:
            from procd import durable

            self._store = durable.Store(fds.store_path)
        self._row = 0  # the durable row of the batch in hand

    def receive(self, stop_fd: int | None = None) -> list[Any] | None:
        """Return the next batch, or None at end of stream.

        Args:
            stop_fd: while waiting, also watch this descriptor; when it becomes readable the wait
                ends and ``Interrupted`` is raised with no message taken from the queue (a
                signal handler cannot do this safely: it may run just after a message arrived).
        """
        if self._store is not None:
            return self._receive_row(stop_fd)
        if self._slot is not None:
            self._slot.arm()
        while True:
            try:
                size, ancdata, flags, _addr = self._sock.recvmsg_into(
                    [self._view], _FD_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
                )
                break
            except BlockingIOError:
                watched = [self._sock.fileno()] if stop_fd is None else [self._sock.fileno(), stop_fd]
                ready, _, _ = select.select(watched, [], [])
                if stop_fd in ready:
                    raise Interrupted from None
            except ConnectionResetError:
                return None
        if size == 0:
            return None
        os.eventfd_write(self._slots_fd, 1)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise OSError(errno.EMSGSIZE, "a queue message was larger than the receive buffer")
        if ancdata:
            memfd = array.array("i", ancdata[0][2][: array.array("i").itemsize])[0]
            with open(memfd, "rb") as fh:
                fh.seek(0)  # the writer's writes moved the shared file offset to the end
                payload = fh.read()
            if self._slot is not None:
                self._slot.hold_large(payload)
            batch: list[Any] = pickle.loads(payload)
            return batch
        if self._slot is not None:
            self._slot.hold(size)
        return pickle.loads(self._view[:size])  # type: ignore[no-any-return]

    def _receive_row(self, stop_fd: int | None) -> list[Any] | None:
        """Durable queue: a doorbell names a row; claim it (or skip one already taken)."""
        assert self._store is not None
        while True:
            try:
                data = self._sock.recv(_ROW.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                watched = [self._sock.fileno()] if stop_fd is None else [self._sock.fileno(), stop_fd]
                ready, _, _ = select.select(watched, [], [])
                if stop_fd in ready:
                    raise Interrupted from None
                continue
            except ConnectionResetError:
                return None
            if not data:
                return None
            (row,) = _ROW.unpack(data)
            payload = self._store.claim(row, os.getpid())
            if payload is None:
                continue  # rung twice: another reader has it, or it is done
            if self._slot is not None:
                self._slot.hold_large(payload, ack=row)
            self._row = row
            batch: list[Any] = pickle.loads(payload)
            return batch

    def done(self) -> None:
        """Every output of the last batch has been handed on: it is no longer held."""
        self.acknowledge(self._row)
        if self._slot is not None:
            self._slot.clear()

    def acknowledge(self, row: int) -> None:
        """Durable queue: delete row ``row`` and free its place in the bound."""
        if self._store is not None and row:
            self._store.ack(row)
            os.eventfd_write(self._slots_fd, 1)
            self._row = 0

    def __iter__(self) -> Iterator[list[Any]]:
        while (batch := self.receive()) is not None:
            yield batch

    def batches(self, stop_fd: int) -> Iterator[list[Any]]:
        """Like iterating, but ends quietly when ``stop_fd`` becomes readable between batches."""
        while True:
            try:
                batch = self.receive(stop_fd)
            except Interrupted:
                return
            if batch is None:
                return
            yield batch

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._view.release()
        self._sock.close()
