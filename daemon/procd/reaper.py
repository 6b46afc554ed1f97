"""The only place in procd that calls ``os.waitpid``.

Signals coalesce (a hundred exits may bring twenty SIGCHLD wake-ups), so ``reap`` loops with
``WNOHANG`` until nothing is left. A command stage's bridge process waits for its one program
with ``wait_for``; both go through ``_waitpid``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Reaped:
    """One child collected: exactly one of ``code`` and ``signal`` is set."""

    pid: int
    code: int | None
    signal: int | None


def _decode(pid: int, status: int) -> Reaped:
    if os.WIFSIGNALED(status):
        return Reaped(pid, None, os.WTERMSIG(status))
    return Reaped(pid, os.waitstatus_to_exitcode(status), None)


def _waitpid(pid: int, flags: int) -> tuple[int, int]:
    try:
        return os.waitpid(pid, flags)
    except ChildProcessError:
        return 0, 0


def reap() -> Iterator[Reaped]:
    """Yield every child that has exited, without blocking."""
    while True:
        pid, status = _waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        yield _decode(pid, status)


def wait_for(pid: int) -> Reaped:
    """Block until child ``pid`` exits and return how it ended.

    Raises:
        ChildProcessError: ``pid`` is not a child of this process.
    """
    got, status = _waitpid(pid, 0)
    if got == 0:
        raise ChildProcessError(errno.ECHILD, f"{pid} is not a child of this process")
    return _decode(got, status)
