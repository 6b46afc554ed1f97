"""Signals reach the supervisor's loop as bytes on a pipe (``signal.set_wakeup_fd``).

The handlers installed here do nothing at all: Python's C-level handler writes the signal number
to the wake-up pipe, and the loop reads it. No logging, no state change, no I/O in a handler.
This module owns that process-wide state: ``open_wakeup`` sets it, ``WakeUp.close`` restores it.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# The signals whose default action ends the process: ``procd`` holds them (blocked) from its first
# line (``procd.__main__``) until a loop can take them, and again once the loop is gone.
HELD = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})


def _nothing(_signum: int, _frame: FrameType | None) -> None:
    """A handler whose only effect is the byte Python writes to the wake-up fd."""


class WakeUp:
    """The read end of the wake-up pipe, and the way back to the previous handlers."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous = {signum: signal.getsignal(signum) for signum in HANDLED}
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, _nothing)
        # whatever arrived while they were held is delivered now, to the wake-up pipe
        self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)

    def drain(self) -> list[int]:
        """Return the signals that arrived since the last call, in order (duplicates kept)."""
        received: list[int] = []
        while True:
            try:
                chunk = os.read(self.read_fd, 4096)
            except BlockingIOError:
                return received
            if not chunk:
                return received
            received.extend(chunk)

    def close(self) -> None:
        """Restore the previous signal mask, handlers and wake-up fd, then close the pipe."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        os.close(self.read_fd)
        os.close(self._write_fd)


def open_wakeup() -> WakeUp:
    """Install the no-op handlers and the wake-up pipe for this (main) thread's loop."""
    return WakeUp()


def release_held() -> None:
    """For a command that has no loop: let the held signals act as usual (Ctrl-C ends it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


def reset_in_child() -> None:
    """In a freshly forked child: drop the parent's wake-up fd and handlers.

    Without this a signal sent to the child would be written into the supervisor's wake-up pipe
    and read there as if the supervisor had received it.
    """
    signal.set_wakeup_fd(-1)
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_DFL)


_terminated = False  # a worker's SIGTERM came (see ``stop_fd_on_sigterm``)


def stop_fd_on_sigterm() -> int:
    """Make SIGTERM mean "finish the current batch, then end": returns a descriptor that becomes
    readable when a signal arrives (Python's wake-up fd, which wakes a wait in any thread at
    once), and ``terminated`` says whether that signal was SIGTERM (a stage may handle signals
    of its own, such as SIGALRM, which must not end the worker)."""
    global _terminated
    _terminated = False
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return read_fd


def _on_sigterm(_signum: int, _frame: object) -> None:
    global _terminated
    _terminated = True


def terminated() -> bool:
    """Whether this worker was asked to end (SIGTERM, since ``stop_fd_on_sigterm``)."""
    return _terminated
