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

End of stream is the socket's own: once every copy of the writing end is closed (all upstream
processes have exited and the supervisor has dropped its copy), ``recv`` returns an empty message.

Only file descriptors cross ``fork``/``exec``; both sides rebuild their objects from the numbers.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from procd.errors import ItemTooLarge

# The largest batch message: SO_SNDBUF is raised to this where the kernel allows it (root may
# exceed net.core.wmem_max with SO_SNDBUFFORCE). Linux doubles the value it is given.
_SNDBUF_BYTES = 4 * 1024 * 1024
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


@dataclass(frozen=True)
class QueueFds:
    """The three descriptors of one local queue; picklable, so it can cross an exec."""

    write_fd: int
    read_fd: int
    slots_fd: int

    def all(self) -> tuple[int, int, int]:
        return (self.write_fd, self.read_fd, self.slots_fd)


def create_queue(slots: int) -> QueueFds:
    """Create a local queue that holds at most ``slots`` messages.

    Returns raw descriptors, close-on-exec; the caller decides who inherits which.
    """
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            writer.setsockopt(socket.SOL_SOCKET, option, _SNDBUF_BYTES)
            break
        except PermissionError:
            continue
    slots_fd = os.eventfd(slots, os.EFD_SEMAPHORE | os.EFD_CLOEXEC)
    return QueueFds(writer.detach(), reader.detach(), slots_fd)


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
        self._limit = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 64

    def send(self, items: list[Any]) -> None:
        """Send ``items`` as one message (or several, if they do not fit in one); blocks while full.

        Raises:
            ItemTooLarge: one item alone is larger than a message can be.
        """
        payload = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > self._limit:
            if len(items) == 1:
                raise ItemTooLarge(
                    f"an item of {len(payload)} bytes does not fit in a queue message "
                    f"(at most {self._limit} bytes)"
                )
            half = len(items) // 2
            self.send(items[:half])
            self.send(items[half:])
            return
        os.eventfd_read(self._slots_fd)
        self._sock.sendall(payload)

    def close(self) -> None:
        self._sock.close()


class QueueReader:
    """The receiving side of one queue, used by a stage's workers."""

    def __init__(self, fds: QueueFds) -> None:
        self._sock = socket.socket(fileno=fds.read_fd)
        self._slots_fd = fds.slots_fd
        size = _SNDBUF_BYTES * 2
        # An anonymous mapping: pages are only touched as large messages arrive.
        self._buffer = mmap.mmap(-1, size)
        self._view = memoryview(self._buffer)

    def receive(self) -> list[Any] | None:
        """Return the next batch, or None at end of stream."""
        while True:
            try:
                size, _ancdata, flags, _addr = self._sock.recvmsg_into([self._view])
                break
            except OSError as exc:  # EINTR is retried by Python itself (PEP 475)
                if exc.errno == errno.ECONNRESET:
                    return None
                raise
        if size == 0:
            return None
        os.eventfd_write(self._slots_fd, 1)
        if flags & socket.MSG_TRUNC:
            raise OSError(errno.EMSGSIZE, "a queue message was larger than the receive buffer")
        batch: list[Any] = pickle.loads(self._view[:size])
        return batch

    def __iter__(self) -> Iterator[list[Any]]:
        while (batch := self.receive()) is not None:
            yield batch

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._view.release()
        self._buffer.close()
        self._sock.close()
