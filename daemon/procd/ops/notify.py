"""sd_notify(3), written here: the service manager's readiness, status, reload, stop and
watchdog messages, as datagrams to ``$NOTIFY_SOCKET``.

About ten lines of socket code, so no dependency (the ``sdnotify`` package is unmaintained and
swallows errors). Without ``NOTIFY_SOCKET`` every call is a no-op. Errors are raised to the
caller, which logs them. The variables are removed from the environment once read, so that the
workers procd starts never talk to the service manager in procd's name.

Discussion. The kernel queues only a few datagrams for a receiver (``net.unix.max_dgram_qlen``:
10 on many machines), and a blocking ``sendto`` into a full queue waits until the service manager
reads. libsystemd's ``sd_notify`` blocks there; procd's loop must not (a stop, a reload, every
worker would wait behind a busy service manager). The socket is non-blocking: a message the
queue has no room for is kept, in order, and sent by ``flush`` (the loop retries shortly after).
Only the latest ``STATUS=``, one ``WATCHDOG=1`` and the latest ``EXTEND_TIMEOUT_USEC=`` (each sets
the deadline from the moment it arrives) are worth keeping among the kept messages, so such
messages are merged into the last kept one when it has only those keys too.

At most ``_KEPT_AT_MOST`` are kept (a receiver gone silent for good). Past that, room is made
without losing what the service manager must hear: first the oldest message of mergeable keys only
is folded into the one after it (whose own values, being later, win); failing that, the oldest
``RELOADING=1`` that a later message follows goes (its ``READY=1`` still arrives); failing that,
the older of two ``READY=1`` in a row (the later says it too). ``READY=1`` and ``STOPPING=1`` are
never dropped.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping

_MERGEABLE = frozenset({"STATUS", "WATCHDOG", "EXTEND_TIMEOUT_USEC"})  # a later one says all an earlier one did
_NEVER_DROPPED = frozenset({"READY", "STOPPING"})
_KEPT_AT_MOST = 64


class Notifier:
    """One connection to the service manager (or none)."""

    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_usec / 2_000_000 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self.pending: list[dict[str, str | int]] = []  # messages the receiver's queue had no room for
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """Read (and remove) ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        watchdog = None
        if usec and usec.isdigit() and (pid is None or pid == str(os.getpid())):
            watchdog = int(usec)
        if address and address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        return cls(address or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        """Send ``KEY=VALUE`` lines in one datagram, e.g. ``send(READY=1, STATUS="...")``, after
        any kept before it; one the receiver has no room for now is kept (see ``pending``).

        Raises:
            OSError: the service manager's socket refused the message.
        """
        if self._sock is None:
            return
        last = self.pending[-1] if self.pending else None
        if last is not None and set(fields) <= _MERGEABLE and set(last) <= _MERGEABLE:
            last.update(fields)
        else:
            self.pending.append(dict(fields))
            if len(self.pending) > _KEPT_AT_MOST:  # a receiver gone silent for good
                self._make_room()
        self.flush()

    def _make_room(self) -> None:
        """One kept message fewer, losing nothing the service manager must hear (see the module
        docstring)."""
        pending = self.pending
        for i, message in enumerate(pending[:-1]):
            if set(message) <= _MERGEABLE:
                for key, value in message.items():
                    pending[i + 1].setdefault(key, value)  # the later message's own value is newer
                del pending[i]
                return
        for i, message in enumerate(pending[:-1]):  # RELOADING=1, once its READY=1 is kept after it
            if not set(message) & _NEVER_DROPPED and any("READY" in later for later in pending[i + 1 :]):
                del pending[i]
                return
        for i, message in enumerate(pending[:-1]):
            later = pending[i + 1]
            if "READY" in message and "READY" in later and not set(message) - _MERGEABLE - {"READY"}:
                for key, value in message.items():
                    later.setdefault(key, value)
                del pending[i]
                return

    def flush(self) -> bool:
        """Send what was kept, in order, as far as the receiver has room; True once all went.

        Raises:
            OSError: the service manager's socket refused a message.
        """
        while self.pending and self._sock is not None and self.address is not None:
            message = "\n".join(f"{key}={value}" for key, value in self.pending[0].items())
            try:
                self._sock.sendto(message.encode(), self.address)
            except BlockingIOError:
                return False
            except OSError:
                del self.pending[0]  # refused: the messages behind it still get their turn
                raise
            del self.pending[0]
        return True

    def reloading(self) -> None:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` that systemd 253 and later require."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
