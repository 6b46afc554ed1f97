"""What the kernel shows in /proc about a process or a descriptor, read on demand.

Used by the local transport: a queue's depth from its eventfd's counter, and which processes still
hold a queue's writing end; and by the command bridge: whether its program sleeps waiting for
input (the system call it sleeps in).
"""

from __future__ import annotations

import os

# System calls a program sleeps in while it waits for input, by architecture: read, and the
# waits (poll, select, pselect6, ppoll, epoll_wait, epoll_pwait).
_SYSCALLS = {
    "x86_64": {"read": {0}, "wait": {7, 23, 232, 270, 271, 281}},
    "aarch64": {"read": {63}, "wait": {22, 72, 73}},
}


def eventfd_count(fd: int) -> int | None:
    """The counter of eventfd ``fd`` of this process, without touching it; None if unreadable."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fh:
            for line in fh:
                if line.startswith("eventfd-count:"):
                    return int(line.split(":", 1)[1].strip(), 16)
    except (OSError, ValueError):
        return None
    return None


def waits_on(pid: int, fd: int) -> bool | None:
    """Whether ``pid`` sleeps reading descriptor ``fd``, or waiting in poll or select (for it,
    presumably); None when the kernel does not say which call it sleeps in (another
    architecture, no permission). A process that is not asleep (running, woken, stopped, a
    zombie, gone) does not wait."""
    if _state(pid) != "S":
        return False
    numbers = _SYSCALLS.get(os.uname().machine)
    if numbers is None:
        return None
    try:
        with open(f"/proc/{pid}/syscall") as fh:
            fields = fh.read().split()
    except OSError:
        return None if _state(pid) == "S" else False
    if not fields or fields[0] == "running":
        return False
    if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
        return None
    number = int(fields[0])
    if not ((number in numbers["read"] and int(fields[1], 16) == fd) or number in numbers["wait"]):
        return False
    # The kernel names the syscall of a task that is not on a CPU, also one woken by new data
    # that has copied it and not yet returned to its own code. Only a task still asleep waits.
    return _state(pid) == "S"


def _state(pid: int) -> str:
    """The one-letter scheduler state of ``pid`` ("" if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def holders(link: str) -> list[int]:
    """Pids of the processes (of those this user may inspect) with a descriptor whose
    ``/proc/PID/fd`` link reads ``link`` (such as ``socket:[1234]``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == link:
                    found.append(int(entry))
                    break
        except OSError:
            continue
    return sorted(found)


def title(pid: int) -> str:
    """The command line of ``pid`` as ``ps`` shows it ("" if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
