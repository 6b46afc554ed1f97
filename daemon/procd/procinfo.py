"""What the kernel shows in /proc about a process or a descriptor, read on demand.

Used by ``procd status``: a queue's depth from its eventfd's counter, and whether a worker is
blocked (waiting on a full output queue or an empty input) from the system call it sleeps in.
Reading costs the workers nothing: they report no state of their own for this.
"""

from __future__ import annotations

import platform

# System calls a worker sleeps in, by architecture: reading an eventfd (a full output queue) and
# waiting in select (an empty input queue; see QueueReader.receive).
_SYSCALLS = {
    "x86_64": {"read": {0}, "wait": {7, 23, 270, 271}},  # read; poll, select, pselect6, ppoll
    "aarch64": {"read": {63}, "wait": {72, 73}},  # read; pselect6, ppoll
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


def blocked_on(pid: int, output_fds: set[int]) -> str | None:
    """``"output"`` if ``pid`` sleeps reading one of ``output_fds`` (a full queue's slot counter),
    ``"input"`` if it sleeps waiting for its input, else None (running, or unknown)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    try:
        with open(f"/proc/{pid}/syscall") as fh:
            fields = fh.read().split()
    except OSError:
        return None
    if len(fields) < 2 or not fields[0].isdigit():  # "running", or no permission
        return None
    number, first_arg = int(fields[0]), int(fields[1], 16)
    if number in numbers["read"] and first_arg in output_fds:
        return "output"
    if number in numbers["wait"]:
        return "input"
    return None
