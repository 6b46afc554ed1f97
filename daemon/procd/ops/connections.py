"""Stream connections that the supervisor's loop serves (control clients, metrics scrapers):
bounded buffers, an idle deadline, and a listener that stops accepting before the supervisor
runs out of descriptors.

Discussion. The loop is level-triggered and single-threaded, so three things must never happen:

- A listener whose ``accept`` fails (``EMFILE``: no descriptor left) stays readable; a loop that
  only ignores the error wakes again at once and spins at 100% CPU. Such a listener *pauses*: it
  leaves the selector for ``PAUSE_S``, while pending connections wait in the kernel's backlog.
- Descriptors are what spawning a worker needs (pipes, queue ends, the in-flight memfd). A
  connection accepted into the last ``RESERVE_FDS`` descriptors below ``RLIMIT_NOFILE`` is closed
  at once and the listener pauses; each listener also serves at most ``max_connections`` peers
  and pauses while it has that many (the next one waits in the backlog until one leaves).
- A peer that sends requests and never reads the replies must not grow the supervisor's memory:
  a connection holds at most ``outbox_limit`` bytes waiting to be sent, after which the server
  stops reading its requests (the peer's own sends then block). A connection with replies waiting
  and none of them read for ``stall_s`` is dropped, and so is one with no traffic at all for
  ``idle_s``.

Buffers are ``bytearray``: appending and consuming from the front are amortised O(1), where
``bytes`` concatenation copied the whole buffer for every reply.
"""

from __future__ import annotations

import resource
import socket

RESERVE_FDS = 32
PAUSE_S = 1.0
_RECV_SIZE = 65536


class Connection:
    """One accepted, non-blocking stream socket."""

    def __init__(self, sock: socket.socket, now: float, *, idle_s: float, stall_s: float, outbox_limit: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.closing = False  # close once the outbox is sent
        self.idle_s = idle_s
        self.stall_s = stall_s
        self.outbox_limit = outbox_limit
        self.active_at = now

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def patience_s(self) -> float:
        """How long the connection may go without traffic: ``stall_s`` while replies wait."""
        return self.stall_s if self.outbox else self.idle_s

    @property
    def deadline(self) -> float:
        """When the connection is dropped unless bytes move before then."""
        return self.active_at + self.patience_s

    @property
    def full(self) -> bool:
        """The peer is behind on reading: take no more requests from it for now."""
        return len(self.outbox) >= self.outbox_limit

    def receive(self, now: float) -> bool:
        """Append what the peer sent to ``inbox``; False once the peer has closed or failed."""
        try:
            chunk = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not chunk:
            return False
        self.inbox += chunk
        self.active_at = now
        return True

    def send(self, data: bytes) -> None:
        """Queue ``data``; ``flush`` sends it."""
        self.outbox += data

    def flush(self, now: float) -> bool:
        """Send what the socket takes now; True when nothing is left (or the peer is gone)."""
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.outbox.clear()
                self.closing = True
                return True
            del self.outbox[:sent]
            self.active_at = now
        return True

    def close(self) -> None:
        self.sock.close()


def descriptor_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` of this process."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Listener:
    """A listening socket that accepts only while it may: below its connection cap, with
    descriptors to spare, and not paused after a failure."""

    def __init__(self, sock: socket.socket, *, max_connections: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_connections = max_connections
        self.open = 0  # connections accepted and not yet released
        self.paused_until = 0.0
        self.refused = 0  # connections closed unserved for want of descriptors

    def fileno(self) -> int:
        return self.sock.fileno()

    def accepting(self, now: float) -> bool:
        """Whether the loop should watch this listener now."""
        return self.open < self.max_connections and now >= self.paused_until

    def take(self, now: float) -> socket.socket | None:
        """One pending connection, or None: nothing pending, or none may be taken now (the
        listener has then paused itself; see ``accepting``)."""
        if not self.accepting(now):
            return None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # EMFILE, ENFILE, ENOBUFS: no room now; wait rather than spin
            self.paused_until = now + PAUSE_S
            self.refused += 1
            return None
        if conn.fileno() >= descriptor_limit() - RESERVE_FDS:  # the rest is for spawning
            conn.close()
            self.paused_until = now + PAUSE_S
            self.refused += 1
            return None
        self.open += 1
        return conn

    def release(self) -> None:
        """A connection this listener accepted has been closed."""
        self.open -= 1

    def close(self) -> None:
        self.sock.close()
