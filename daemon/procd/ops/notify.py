"""sd_notify(3), written here: the service manager's readiness, status, reload, stop and
watchdog messages, as datagrams to ``$NOTIFY_SOCKET``.

About ten lines of socket code, so no dependency (the ``sdnotify`` package is unmaintained and
swallows errors). Without ``NOTIFY_SOCKET`` every call is a no-op. Errors are raised to the
caller, which logs them. The variables are removed from the environment once read, so that the
workers procd starts never talk to the service manager in procd's name.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping


class Notifier:
    """One connection to the service manager (or none)."""

    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_usec / 2_000_000 if watchdog_usec else None
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

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
        """Send ``KEY=VALUE`` lines in one datagram, e.g. ``send(READY=1, STATUS="...")``.

        Raises:
            OSError: the service manager's socket refused the message.
        """
        if self._sock is None or self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        self._sock.sendto(message.encode(), self.address)

    def reloading(self) -> None:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` that systemd 253 and later require."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
