"""The slot file: what one worker slot holds, kept where the supervisor and the slot's next
process can read it after the current one is killed.

Each worker slot owns one ``memfd`` for its whole life (every generation of the slot gets the
same one). Its 64-byte header says, as plain numbers the supervisor reads without unpickling
anything: whether a batch is held and how many items it has, which item was in hand when a
redelivered batch killed a process again (and how often), how often the batch has been
delivered, whether the process may hold one unit of its input's or of one output's capacity
(``in_token``, ``out_token``: the supervisor gives it back when the process dies; two fields, as
a command bridge reads and writes in two threads), and what the process is waiting for
(``waiting``: ``procd status`` shows it as blocked), and whether the process has seen its input's
end (``input_ended``: only then is its exit 0 a clean end).

A reader receives each message straight into the payload area (a shared mapping), so there is no
instant at which a message has left the queue but is not recoverable. A message starts with its
own small header (kind, item count, length of what follows), so a slot that was armed for a
receive (RECEIVING) holds a batch exactly when a message kind is there.

Header states: EMPTY (nothing held), RECEIVING (armed for a receive), HELD.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

EMPTY, RECEIVING, HELD = 0, 1, 2
NO_INDEX = -1
NO_TOKEN = -1  # out_token: else the output's number, 0, 1, ... in the order the worker got them
RUNNING, WAITING_INPUT, WAITING_OUTPUT = 0, 1, 2
# state, message length, item in hand (careful mode), crashes on it, deliveries, how the last
# process ended (signal, code; -1 = none), in_token (0 or 1), out_token, waiting, input_ended
_HEADER = struct.Struct("<IIiIIiiiiII")
_RECEIVE = struct.Struct("<IIiIIiii")  # the header up to in_token: what a receive sets
_STATE, _INDEX, _DELIVERIES, _EXIT, _IN_TOKEN, _OUT_TOKEN, _WAITING, _ENDED = 0, 8, 16, 20, 28, 32, 36, 40
PAYLOAD_OFFSET = 64
# A message: kind, item count, bytes that follow (a pickle, a file name, a row id).
MESSAGE = struct.Struct("<BII")
INLINE, SPILLED, ROW, ENTRY = b"P"[0], b"S"[0], b"R"[0], b"E"[0]  # ENTRY: a Redis stream entry id
# The largest message any backend receives into a slot: larger batches travel by reference.
MESSAGE_CAPACITY = MESSAGE.size + 60 * 1024
KINDS = (INLINE, SPILLED, ROW, ENTRY)


@dataclass(frozen=True)
class Header:
    """What a slot file says (supervisor side: numbers only)."""

    state: int
    kind: int  # the held message's kind, 0 if none
    items: int
    index: int
    crashes: int
    deliveries: int
    last_signal: int
    last_code: int
    in_token: int
    out_token: int
    waiting: int
    input_ended: int  # 1: the process has received its input's end of stream

    @property
    def holds(self) -> bool:
        """A batch is held: its next process must deliver it."""
        return self.kind in KINDS

    @property
    def in_hand(self) -> int:
        """The held batch's items not yet done (from ``index`` on, in careful mode); 0 if none."""
        return self.items - max(self.index, 0) if self.holds else 0


def create(payload_capacity: int) -> int:
    """A new slot file (supervisor side) with room for one message of ``payload_capacity`` bytes
    (0 for a slot that only keeps the header: a producer, or ``redeliver = false``).

    Raises:
        OSError: it cannot be made (EMFILE, ENOMEM).
    """
    fd = os.memfd_create("procd-slot", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, PAYLOAD_OFFSET + payload_capacity)
        os.pwrite(fd, _HEADER.pack(EMPTY, 0, NO_INDEX, 0, 0, -1, -1, 0, NO_TOKEN, RUNNING, 0), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def read(fd: int) -> Header:
    """The slot's header, and the kind and item count of a message in it."""
    header = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
    state, _length, index, crashes, deliveries, last_signal, last_code, in_token, out_token, waiting, ended = header
    kind = items = 0
    if state in (RECEIVING, HELD):
        message = os.pread(fd, MESSAGE.size, PAYLOAD_OFFSET)
        if len(message) == MESSAGE.size:
            kind, items, _size = MESSAGE.unpack(message)
            if kind not in KINDS:
                kind = items = 0
    return Header(
        state, kind, items, index, crashes, deliveries, last_signal, last_code, in_token, out_token, waiting, ended
    )


def note_exit(fd: int, signal: int | None, code: int | None) -> None:
    """Record how the slot's last process ended (for a dead-letter record written by the next)."""
    os.pwrite(fd, struct.pack("<ii", -1 if signal is None else signal, -1 if code is None else code), _EXIT)


def clear_tokens(fd: int) -> None:
    """The supervisor has given back the capacity a dead process may have held."""
    os.pwrite(fd, struct.pack("<iiI", 0, NO_TOKEN, RUNNING), _IN_TOKEN)


class SlotFile:
    """The worker's side: a shared mapping of the slot file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        self.capacity = len(self._map) - PAYLOAD_OFFSET
        self.buffer = memoryview(self._map)[PAYLOAD_OFFSET:]

    def header(self) -> Header:
        return read(self.fd)

    def message(self) -> bytes:
        """The held message, whole."""
        _kind, _items, size = MESSAGE.unpack_from(self._map, PAYLOAD_OFFSET)
        return bytes(self._map[PAYLOAD_OFFSET : PAYLOAD_OFFSET + MESSAGE.size + size])

    def arm(self) -> None:
        """About to receive into the payload area: any earlier message is wiped first, and the
        process may hold a unit of its input's capacity from here until ``input_token(False)``."""
        if self.capacity:
            self._map[PAYLOAD_OFFSET] = 0
        _RECEIVE.pack_into(self._map, 0, RECEIVING, 0, NO_INDEX, 0, 1, -1, -1, 1)
        struct.pack_into("<I", self._map, _WAITING, RUNNING)

    def disarm(self, waiting: int = RUNNING) -> None:
        """Nothing was received."""
        _RECEIVE.pack_into(self._map, 0, EMPTY, 0, NO_INDEX, 0, 0, -1, -1, 0)
        struct.pack_into("<I", self._map, _WAITING, waiting)

    def hold(self, length: int, deliveries: int = 1) -> None:
        """A message of ``length`` bytes is in the payload area."""
        struct.pack_into("<II", self._map, 0, HELD, length)
        struct.pack_into("<I", self._map, _DELIVERIES, deliveries)

    def input_token(self, held: bool) -> None:
        """This process may hold a unit of its input's capacity (or no longer does)."""
        struct.pack_into("<i", self._map, _IN_TOKEN, int(held))

    def output_token(self, which: int, waiting: int = RUNNING) -> None:
        """This process may hold a unit of capacity of output ``which`` (``NO_TOKEN``: none)."""
        struct.pack_into("<iI", self._map, _OUT_TOKEN, which, waiting)

    def at(self, index: int, crashes: int) -> None:
        """Careful mode: item ``index`` is in hand, having crashed a process ``crashes`` times."""
        struct.pack_into("<iI", self._map, _INDEX, index, crashes)

    def input_ended(self, ended: bool = True) -> None:
        """This process has received its input's end of stream (or, with False, a new process
        has not yet): the supervisor counts an exit 0 as clean only after it."""
        struct.pack_into("<I", self._map, _ENDED, int(ended))

    def clear(self) -> None:
        """Every output of the held batch has been handed on."""
        struct.pack_into("<I", self._map, _STATE, EMPTY)
        if self.capacity:
            self._map[PAYLOAD_OFFSET] = 0
