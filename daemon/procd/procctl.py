"""Linux process controls procd relies on, through ``prctl(2)`` (no Python binding exists).

- ``PR_SET_CHILD_SUBREAPER``: orphaned descendants are re-parented to the supervisor, which
  reaps them instead of init.
- ``PR_SET_PDEATHSIG``: the kernel signals a worker when the thread that forked it exits. It is
  armed in the child, so the child must then check that its parent is still the one it expects.

Also ``malloc_trim(3)``, to hand the heap that start-up freed back to the kernel before a long idle,
the process title (setproctitle), and closing every descriptor but a few after ``fork``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux 3.4 and later)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int, expected_parent: int) -> None:
    """Ask for ``signum`` when the parent exits; exit now if it already has.

    The parent can die between ``fork`` and this call, in which case the signal would never
    come: the check of ``getppid`` afterwards closes that race.
    """
    _prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != expected_parent:
        os._exit(1)


def release_free_memory() -> None:
    """Return free heap pages to the kernel (glibc only; elsewhere a no-op)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def set_title(title: str) -> None:
    """Name this process as ``ps`` and ``/proc/PID/cmdline`` show it."""
    import setproctitle  # here: it imports ``logging`` (3 ms), which ``procd check`` has no use for

    setproctitle.setproctitle(title)


def close_all_but(keep: set[int]) -> None:
    """Close every descriptor of this process except ``keep``."""
    previous = -1
    for fd in [*sorted(keep), os.sysconf("SC_OPEN_MAX")]:
        if fd > previous + 1:
            os.closerange(previous + 1, fd)
        previous = fd


def fork_blocked() -> tuple[int, set[int | signal.Signals]]:
    """``fork`` with every signal blocked, so no handler of this process runs in the child before
    the child has reset them. Returns the pid and the mask to restore; the parent's is restored
    already, the child must restore it itself once its handlers are reset.

    Raises:
        OSError: fork failed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid, mask


def wire_worker_stdio(output_fd: int, keep: set[int]) -> None:
    """In a new worker: stdin from /dev/null, stdout and stderr to ``output_fd`` (line-buffered,
    the supervisor logs each line), every other descriptor but ``keep`` closed."""
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    close_all_but({0, 1, 2} | keep)
    null = os.open(os.devnull, os.O_RDONLY)  # after the closing: at the fd limit there is room now
    os.dup2(null, 0)
    if null != 0:
        os.close(null)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def run_and_exit(body: Callable[[], int]) -> NoReturn:
    """In a child process: run ``body`` and ``_exit`` with its code, whatever happens.

    The child can never return into its parent's code (a forked copy would otherwise carry on
    as a second supervisor); an exception is printed (to the worker's output, so it is logged)
    and the exit code is 1.
    """
    code = 1
    try:
        code = body()
    except BaseException:
        import traceback  # only a child that failed prints one (the supervisor has it: structlog)

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
