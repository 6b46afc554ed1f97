"""Reading processes from outside, through /proc: the tree, CPU time, memory, and the machine.

Every benchmark measures procd and its anchor the same way, from these readers, so a figure
never depends on what the measured program says about itself (the exception: a worker that
reads its own CPU time at its end, see ``CPU_SECONDS_SOURCE``).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")

# Pasted into stage modules and classic scripts: the CPU time a process has had, in seconds, all
# its threads together (CLOCK_PROCESS_CPUTIME_ID, in nanoseconds). Not /proc/self/schedstat:
# that is the main thread's alone, and would leave out what multiprocessing.Queue's feeder
# thread (which pickles and sends every put) and procd's ticker and bridge threads do.
CPU_SECONDS_SOURCE = """
def cpu_seconds():
    import time
    return time.process_time()
"""


def children(pid: int) -> set[int]:
    """The direct children of ``pid`` (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return {int(p) for p in fh.read().split()}
    except OSError:
        return set()


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` in the tree."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def comm(pid: int) -> str:
    """The process's command name ("" once it is gone); it changes at exec."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pss_kib(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (shared pages divided among sharers)."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise ValueError(f"no Pss line in /proc/{pid}/smaps_rollup")


def rss_kib(pid: int) -> int:
    """Resident set size from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS line in /proc/{pid}/status")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.0002) -> T:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s")
        time.sleep(interval)


def machine() -> dict[str, Any]:
    """Cores, CPU model and the load average now."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "load": os.getloadavg()}


def load_text() -> str:
    """The load average as ``uptime`` prints it."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]  # guest is inside user
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_cpu_s() -> float:
    """CPU seconds of this process and of every descendant it (or they) waited for."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + waited.ru_utime + waited.ru_stime


class ForeignCpu:
    """Measures, over a ``with`` block, the share of the machine's CPU capacity used by processes
    other than this one and its descendants (another developer's tests, say). Children must have
    been waited for by the block's end to count as ours."""

    share = 0.0

    def __enter__(self) -> ForeignCpu:
        self._start = (time.monotonic(), machine_busy_s(), own_cpu_s())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        wall, busy, own = (
            now - then for now, then in zip((time.monotonic(), machine_busy_s(), own_cpu_s()), self._start, strict=True)
        )
        capacity = wall * (os.cpu_count() or 1)
        self.share = max(0.0, busy - own) / capacity if capacity > 0 else 0.0
