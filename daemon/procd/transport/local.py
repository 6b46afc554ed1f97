"""The local backend (``queue.backend = "memory"``, the default): bounded, atomic messages, no
lock a dead process could hold, and a bound no dead process can shrink.

Discussion. ``multiprocessing.Queue`` is ruled out: a reader killed while it holds the queue's
shared reader lock wedges every other reader forever, a killed reader can leave half a message in
the pipe, and the feeder thread loses items when a process exits without joining it.

Messages: an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair per stage input. Every writer shares one
end, every reader the other. The kernel delivers each message whole to exactly one reader, and a
process that dies mid-call either sent (or received) a whole message or nothing. A message is one
batch: a small header (``slot.MESSAGE``) and the pickle. The kernel builds a datagram from one
contiguous allocation, which fails for megabytes, so a batch that pickles to more than
``INLINE_LIMIT`` bytes is written to a spill file (in a directory of the input's own on
``/dev/shm``) and the message carries its name: a name, unlike a passed descriptor, still means
the batch after the reader that received it was killed.

The bound: an ``eventfd`` counts free message slots (``ceil(maxsize / batch)``). A writer takes
one before it sends (waiting while the input is full: backpressure), a reader gives one back
after each receive. Taking and sending (or receiving and giving back) are two system calls, and a
process can be killed between them; so each process marks in its slot file's header, before the
first call, that it may hold a unit (``SlotFile.input_token``, ``SlotFile.output_token``), and clears the
mark after the second. When a process dies with the mark set, the supervisor gives the unit back
(``LocalInput.reclaim``). The marks are set before the call that takes and cleared after the
one that passes the unit on, so a mark is never missing while a unit is held: a killed process
can never shrink the bound (the wedge this rules out is a queue that looks full for ever). A
process killed in the few instructions between a mark and its call can make the bound one batch
looser; the supervisor takes back any unit beyond the bound it can see. The kernel's socket buffer (4 MiB)
is a second, byte-sized bound.

End of stream is the socket's own: once every copy of the writing end is closed (all upstream
processes have exited and the supervisor has dropped its copy), ``recv`` returns an empty message.
"""

from __future__ import annotations

import os
import pickle
import select
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

from procd import procinfo
from procd.config import QueueSpec
from procd.transport import Endpoint, Held, Input, Reader, Writer, pickled, wait_readable
from procd.transport.slot import (
    INLINE,
    MESSAGE,
    MESSAGE_CAPACITY,
    NO_TOKEN,
    SPILLED,
    WAITING_INPUT,
    WAITING_OUTPUT,
    SlotFile,
)

# The socket buffer (a byte bound besides the slot count): raised to this where the kernel allows
# it (root may exceed net.core.wmem_max with SO_SNDBUFFORCE). Linux doubles the value it is given.
_SNDBUF_BYTES = 4 * 1024 * 1024
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# Larger payloads are spilled to a file (see the module docstring).
MESSAGE_LIMIT = MESSAGE_CAPACITY
INLINE_LIMIT = MESSAGE_LIMIT - MESSAGE.size


def _spill_root() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()


def make_spill_dir(stage: str) -> str:
    """A directory for one input's spilled batches, named after this supervisor's pid. The
    directories of supervisors that are gone (killed before they could remove theirs) are removed
    first: a spilled batch is memory on ``/dev/shm``."""
    root = _spill_root()
    for name in os.listdir(root):
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "procd" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's
        path = os.path.join(root, name)
        if os.path.isdir(path) and os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"procd-{os.getpid()}-{stage}-", dir=root)


@dataclass(frozen=True)
class LocalEndpoint(Endpoint):
    """A worker's view of a local input: the socket pair's two ends, the eventfd of free slots,
    and the input's spill directory."""

    write_fd: int
    read_fd: int
    slots_fd: int
    spill_dir: str

    def reader_fds(self) -> set[int]:
        return {self.read_fd, self.slots_fd}

    def writer_fds(self) -> set[int]:
        return {self.write_fd, self.slots_fd}

    def writer(self, slot: SlotFile | None = None, token: int = 0) -> Writer:
        return LocalWriter(self, slot, token)

    def reader(self, slot: SlotFile | None = None, *, keep_batch: bool = True, worker: int = 0) -> Reader:
        return LocalReader(self, slot, keep_batch=keep_batch)


def _attach_fields(endpoint: LocalEndpoint, backend: str) -> dict[str, Any]:
    return {"backend": backend, "spill_dir": endpoint.spill_dir}


@dataclass(eq=False)
class LocalInput(Input):
    """The supervisor's side of a local input: its descriptors, and whether it still holds the
    writing end (end of stream is its closing)."""

    fds: LocalEndpoint = field(default=LocalEndpoint(-1, -1, -1, ""))
    writing: bool = True  # the supervisor still holds the writing end
    write_inode: int = 0  # the writing end's socket, as /proc shows it: socket:[inode]

    @property
    def ended(self) -> bool:
        return not self.writing

    def endpoint(self) -> LocalEndpoint:
        return self.fds

    def end(self) -> None:
        if self.writing:
            os.close(self.fds.write_fd)
            self.writing = False

    def depth(self) -> int | None:
        free = procinfo.eventfd_count(self.fds.slots_fd)
        return None if free is None else max(0, self.spec.slots - free)

    def reclaim(self) -> None:
        os.eventfd_write(self.fds.slots_fd, 1)
        free = procinfo.eventfd_count(self.fds.slots_fd)
        while free is not None and free > self.spec.slots:  # a mark set a moment before its call
            try:
                os.eventfd_read(self.fds.slots_fd)
            except BlockingIOError:
                break
            free -= 1

    def attach(self) -> tuple[dict[str, Any], tuple[int, ...]]:
        return _attach_fields(self.fds, "memory"), (self.fds.write_fd, self.fds.slots_fd)

    def holders(self) -> list[int]:
        return procinfo.holders(f"socket:[{self.write_inode}]")

    def close(self) -> None:
        self.end()
        for fd in (self.fds.read_fd, self.fds.slots_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.fds.spill_dir, ignore_errors=True)


def open_pair(slots: int) -> tuple[int, int, int]:
    """A socket pair and its slot counter (``slots`` free): raw descriptors, close-on-exec."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            writer.setsockopt(socket.SOL_SOCKET, option, _SNDBUF_BYTES)
            break
        except PermissionError:
            continue
    slots_fd = os.eventfd(slots, os.EFD_SEMAPHORE | os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return writer.detach(), reader.detach(), slots_fd


def create(stage: str, spec: QueueSpec) -> LocalInput:
    write_fd, read_fd, slots_fd = open_pair(spec.slots)
    spill_dir = make_spill_dir(stage)
    return LocalInput(
        stage, spec, fds=LocalEndpoint(write_fd, read_fd, slots_fd, spill_dir), write_inode=os.fstat(write_fd).st_ino
    )


def attached_writer(fields: dict[str, Any], fds: list[int]) -> Writer:
    return LocalWriter(LocalEndpoint(fds[0], -1, fds[1], str(fields["spill_dir"])), None, 0, owns_slots_fd=True)


class LocalWriter(Writer):
    """Sends batches: takes a unit of the bound, then sends (see the module docstring)."""

    def __init__(
        self, endpoint: LocalEndpoint, slot: SlotFile | None, token: int, *, owns_slots_fd: bool = False
    ) -> None:
        self._endpoint = endpoint
        self._sock = socket.socket(fileno=endpoint.write_fd)
        self._slots_fd = endpoint.slots_fd
        self._slot = slot
        self._token = token
        self._owns_slots_fd = owns_slots_fd
        self._spilled = 0

    def encode(self, items: list[Any]) -> bytes:
        return pickled(items)

    def send_encoded(self, count: int, payload: bytes) -> None:
        if len(payload) <= INLINE_LIMIT:
            self._send(MESSAGE.pack(INLINE, count, len(payload)), payload)
            return
        name = self._spill(payload).encode()
        self._send(MESSAGE.pack(SPILLED, count, len(name)), name)

    def _message(self, kind: int, count: int, body: bytes) -> None:
        """Send one message of another kind (a durable input's row id)."""
        self._send(MESSAGE.pack(kind, count, len(body)), body)

    def _send(self, header: bytes, body: bytes) -> None:
        self._take()
        self._sock.sendmsg([header, body])
        if self._slot is not None:
            self._slot.output_token(NO_TOKEN)

    def _take(self) -> None:
        slot, fd = self._slot, self._slots_fd
        while True:
            if slot is not None:
                slot.output_token(self._token)
            try:
                os.eventfd_read(fd)
                return
            except BlockingIOError:
                if slot is not None:
                    slot.output_token(NO_TOKEN, WAITING_OUTPUT)
                select.select([fd], [], [])

    def _spill(self, payload: bytes) -> str:
        self._spilled += 1
        path = os.path.join(self._endpoint.spill_dir, f"{os.getpid()}-{self._spilled}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with memoryview(payload) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
        finally:
            os.close(fd)
        return os.path.basename(path)

    def close(self) -> None:
        self._sock.close()
        if self._owns_slots_fd:
            os.close(self._slots_fd)


class LocalReader(Reader):
    """Receives batches, into the slot file when there is one (see ``slot``)."""

    def __init__(self, endpoint: LocalEndpoint, slot: SlotFile | None, *, keep_batch: bool = True) -> None:
        self._endpoint = endpoint
        self._sock = socket.socket(fileno=endpoint.read_fd)
        self._slots_fd = endpoint.slots_fd
        self._slot = slot
        self._keep = keep_batch and slot is not None and slot.capacity >= MESSAGE_LIMIT
        if self._keep:
            assert slot is not None
            self._view = slot.buffer[:MESSAGE_LIMIT]
        else:
            self._view = memoryview(bytearray(MESSAGE_LIMIT))
        self._spill_name = ""  # the spill file of the batch in hand

    def receive(self, stop_fd: int | None = None) -> list[Any] | None:
        slot = self._slot
        while True:
            if slot is not None:
                slot.arm()
            try:
                size, _ancdata, flags, _addr = self._sock.recvmsg_into([self._view], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if slot is not None:
                    slot.disarm(WAITING_INPUT)
                wait_readable(self._sock.fileno(), stop_fd)
                continue
            except ConnectionResetError:
                size, flags = 0, 0
            break
        if size == 0:
            if slot is not None:
                slot.disarm()
            return None
        if slot is not None and self._keep:
            slot.hold(size)
        os.eventfd_write(self._slots_fd, 1)
        if slot is not None:
            slot.input_token(False)
        if flags & socket.MSG_TRUNC:
            raise OSError("a queue message was larger than the receive buffer")
        return self._load(bytes(self._view[:size]) if not self._keep else self._view[:size])

    def _load(self, message: bytes | memoryview) -> list[Any]:
        """The items of one message (worker side: this unpickles)."""
        kind, _count, size = MESSAGE.unpack_from(message)
        body = message[MESSAGE.size : MESSAGE.size + size]
        if kind == SPILLED:
            self._spill_name = bytes(body).decode()
            with open(os.path.join(self._endpoint.spill_dir, self._spill_name), "rb") as fh:
                items: list[Any] = pickle.load(fh)
            return items
        return self._load_other(kind, body)

    def _load_other(self, kind: int, body: bytes | memoryview) -> list[Any]:
        if kind != INLINE:
            raise ValueError(f"a message of unknown kind {kind} arrived on a local queue")
        items: list[Any] = pickle.loads(body)
        return items

    def held(self) -> Held | None:
        slot = self._slot
        if slot is None or not self._keep:
            return None
        header = slot.header()
        if not header.holds:
            slot.clear()
            return None
        message = slot.message()
        slot.hold(len(message), header.deliveries + 1)
        try:
            items = self._load(message)
        except FileNotFoundError:  # acknowledged just before its process was killed
            slot.clear()
            return None
        return Held(items, header.index, header.crashes, header.deliveries, header.last_signal, header.last_code)

    def done(self) -> None:
        if self._slot is not None:
            if self._keep:
                self._slot.clear()
            else:  # nothing is held, and the slot file must not say a batch may be
                self._slot.disarm()
        if self._spill_name:
            try:
                os.unlink(os.path.join(self._endpoint.spill_dir, self._spill_name))
            except FileNotFoundError:
                pass
            self._spill_name = ""

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._view.release()
        self._sock.close()
