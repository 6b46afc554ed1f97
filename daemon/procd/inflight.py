"""The batch a worker holds, kept where the supervisor and the worker's successor can read it.

Each worker slot owns one ``memfd`` for its whole life (every generation of the slot gets the
same one). A reader receives each batch straight into it (``recvmsg_into`` a shared mapping), so
there is no instant at which a message has left the queue but is not yet recoverable: if the
process dies while its batch is marked held, the next process of the slot finds the batch there
and processes it before anything else (at-least-once). The header also says which item was being
processed when a redelivered batch killed a process again, and how often, so a poison item can be
set aside after ``max_attempts`` crashes.

Header states: EMPTY (nothing held), RECEIVING (armed for a receive: a batch is there only if a
pickle starts at the payload offset; pickle ignores the bytes after its end), HELD.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any

EMPTY, RECEIVING, HELD = 0, 1, 2
NO_INDEX = -1
# state, payload length, index of the item in hand (careful mode), crashes on that item,
# deliveries of this batch so far, how the last process ended (signal, code; -1 = none), and the
# durable queue row to acknowledge when the batch is done (0 = none)
_HEADER = struct.Struct("<IIiIIiiq")
PAYLOAD_OFFSET = 64
_PICKLE_START = pickle.PROTO + bytes([pickle.HIGHEST_PROTOCOL])


@dataclass(frozen=True)
class Held:
    """What a slot held when its process ended."""

    state: int
    items: list[Any]
    index: int
    crashes: int
    deliveries: int
    last_signal: int
    last_code: int
    ack: int


def create(inline_capacity: int) -> int:
    """A new slot memfd (supervisor side), sized for one inline batch."""
    fd = os.memfd_create("procd-inflight", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAYLOAD_OFFSET + inline_capacity + 1)
    os.pwrite(fd, _HEADER.pack(EMPTY, 0, NO_INDEX, 0, 0, -1, -1, 0), 0)
    return fd


def read(fd: int) -> Held | None:
    """The batch the slot holds, or None (supervisor, or a new process of the slot)."""
    header = os.pread(fd, _HEADER.size, 0)
    state, length, index, crashes, deliveries, last_signal, last_code, ack = _HEADER.unpack(header)
    if state == EMPTY:
        return None
    if state == RECEIVING:
        if os.pread(fd, 2, PAYLOAD_OFFSET) != _PICKLE_START:
            return None  # died before the receive delivered anything
        length = os.fstat(fd).st_size - PAYLOAD_OFFSET
    payload = os.pread(fd, length, PAYLOAD_OFFSET)
    try:
        items = pickle.loads(payload)
    except Exception:
        return None  # RECEIVING with a stale pickle start but no whole message: nothing was taken
    return Held(state, items, index, crashes, deliveries, last_signal, last_code, ack)


def note_exit(fd: int, signal: int | None, code: int | None) -> None:
    """Record how the slot's last process ended (for a dead-letter record written by the next)."""
    os.pwrite(fd, struct.pack("<ii", -1 if signal is None else signal, -1 if code is None else code), 20)


class Slot:
    """The worker's side: a shared mapping of the slot memfd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        self.buffer = memoryview(self._map)[PAYLOAD_OFFSET:]

    def arm(self) -> None:
        """About to receive: any earlier pickle start is wiped first."""
        self._map[PAYLOAD_OFFSET : PAYLOAD_OFFSET + 2] = b"\0\0"
        _HEADER.pack_into(self._map, 0, RECEIVING, 0, NO_INDEX, 0, 1, -1, -1, 0)

    def hold(self, length: int) -> None:
        """The receive put ``length`` bytes in the buffer."""
        struct.pack_into("<II", self._map, 0, HELD, length)

    def hold_large(self, payload: bytes, deliveries: int = 1, ack: int = 0) -> None:
        """A batch written through the fd (the file grows if it must): a large one, a durable
        queue's row (``ack``), or one being delivered again."""
        if PAYLOAD_OFFSET + len(payload) > os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, PAYLOAD_OFFSET + len(payload))
        os.pwrite(self.fd, payload, PAYLOAD_OFFSET)
        _HEADER.pack_into(self._map, 0, HELD, len(payload), NO_INDEX, 0, deliveries, -1, -1, ack)

    def at(self, index: int, crashes: int) -> None:
        """Careful mode: item ``index`` is in hand, having crashed a process ``crashes`` times."""
        struct.pack_into("<iI", self._map, 8, index, crashes)

    def clear(self) -> None:
        """Every output of the held batch has been handed on."""
        struct.pack_into("<I", self._map, 0, EMPTY)
