"""Where a restart's time goes: kernel tracepoints (``perf trace``) around SIGKILLs of a command
stage's program and of a function stage's worker, as a cumulative timeline from the kill.

    .venv/bin/python bench/restart_trace.py [--kills 20]

Needs ``perf`` with access to tracepoints (``perf_event_paranoid`` <= 2 as root). Traces the
whole machine (``perf trace -a``) for scheduler and signal tracepoints only, then keeps the events
of procd's processes: for each kill, the moments (ms after the SIGKILL was generated, medians over
the kills) at which the killed process exits, its bridge exits (command stage), SIGCHLD reaches
the supervisor, the supervisor's ``wait4`` returns, the supervisor forks, the new bridge forks the
program, and the program's ``exec`` is done.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from harness import Pipeline
from procfs import children, comm, load_text, wait_for
from restart import RESTART, STAGES

EVENTS = ",".join(
    (
        "sched:sched_process_fork",
        "sched:sched_process_exec",
        "sched:sched_process_exit",
        "signal:signal_generate",
        "syscalls:sys_exit_wait4",
    )
)
LINE = re.compile(r"^\s*(?P<t>[\d.]+) (?P<comm>.*)/(?P<tid>\d+) (?P<event>\w+:\w+)\((?P<args>.*)\)\s*$")
ARG = re.compile(r"(\w+): (-?\d+)")


def parse(path: str) -> list[tuple[float, int, str, dict[str, int]]]:
    """(ms, acting tid, event, numeric arguments) of every line of a ``perf trace`` output."""
    events = []
    with open(path) as fh:
        for line in fh:
            m = LINE.match(line)
            if m:
                args: dict[str, int] = {}
                for key, value in ARG.findall(m["args"]):
                    args.setdefault(key, int(value))
                events.append((float(m["t"]), int(m["tid"]), m["event"], args))
    return events


def timeline(
    events: list[tuple[float, int, str, dict[str, int]]], supervisor: int, victim: int, bridge: int | None
) -> dict[str, float]:
    """Cumulative ms after the SIGKILL of ``victim`` per step (a step not seen is left out)."""
    steps: dict[str, float] = {}
    start = next(
        (
            t
            for t, _tid, e, a in events
            if e == "signal:signal_generate" and a.get("sig") == 9 and a.get("pid") == victim
        ),
        None,
    )
    if start is None:
        return steps
    after = [(t - start, tid, e, a) for t, tid, e, a in events if t >= start]
    dead = bridge if bridge is not None else victim

    def first(name: str, match: Callable[[int, str, dict[str, int]], bool]) -> dict[str, int] | None:
        since = max(steps.values(), default=0.0)
        for t, tid, e, a in after:
            if t >= since and match(tid, e, a):
                steps[name] = t
                return a
        return None

    first(
        "program exits" if bridge else "worker exits",
        lambda tid, e, a: e == "sched:sched_process_exit" and a.get("pid") == victim,
    )
    if bridge is not None:
        first("bridge exits", lambda tid, e, a: e == "sched:sched_process_exit" and a.get("pid") == bridge)
    first(
        "SIGCHLD to the supervisor",
        lambda tid, e, a: (
            e == "signal:signal_generate" and a.get("sig") == 17 and a.get("pid") == supervisor and tid == dead
        ),
    )
    first(
        "supervisor's wait4 returns it",
        lambda tid, e, a: e == "syscalls:sys_exit_wait4" and tid == supervisor and a.get("ret") == dead,
    )
    forked = first(
        "supervisor forks", lambda tid, e, a: e == "sched:sched_process_fork" and a.get("parent_pid") == supervisor
    )
    if bridge is not None and forked is not None:
        new_bridge = forked["child_pid"]
        program = first(
            "new bridge forks the program",
            lambda tid, e, a: e == "sched:sched_process_fork" and a.get("parent_pid") == new_bridge,
        )
        if program is not None:
            first(
                "program's exec done",
                lambda tid, e, a: e == "sched:sched_process_exec" and a.get("pid") == program["child_pid"],
            )
    return steps


def trace(kills: int, *, command: bool) -> list[dict[str, float]]:
    stage = 'command = ["sleep", "3600"]' if command else 'function = "benchstages:idle"'
    with Pipeline(f"[stages.work]\n{stage}\n{RESTART}\n", STAGES, name="bench-trace") as pipeline:
        pipeline.start()
        pipeline.event("pipeline_ready")
        supervisor = pipeline.pid

        def target() -> tuple[int, int | None] | None:
            workers = children(supervisor)
            if len(workers) != 1:
                return None
            (worker,) = workers
            if not command:
                return worker, None
            programs = [p for p in children(worker) if comm(p) == "sleep"]
            return (programs[0], worker) if programs else None

        output = str(pipeline.dir / "trace.txt")
        perf = subprocess.Popen(
            ["perf", "trace", "-a", "-o", output, "-e", EVENTS, "--", "sleep", str(1.0 + kills * 0.15)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # perf is attached
        killed = []
        for _ in range(kills):
            victim, bridge = wait_for(target, timeout=30)
            os.kill(victim, signal.SIGKILL)
            killed.append((victim, bridge))
            wait_for(lambda victim=victim: (t := target()) and t[0] != victim, timeout=30)
            time.sleep(0.1)
        perf.wait(timeout=60)
        pipeline.remember()
        events = parse(output)
    return [timeline(events, supervisor, victim, bridge) for victim, bridge in killed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")
    print(f"{load_text()}")
    for command in (True, False):
        runs = [r for r in trace(args.kills, command=command) if r]
        kind = "command" if command else "function"
        print(f"\n{kind} stage, {len(runs)} kills traced; cumulative ms after the SIGKILL, median (p95):")
        names = list(dict.fromkeys(name for run in runs for name in run))
        for name in names:
            values = sorted(run[name] for run in runs if name in run)
            p95 = values[max(0, int(len(values) * 0.95) - 1)]
            print(f"  {statistics.median(values):7.2f} ({p95:6.2f})  {name}  [{len(values)} of {len(runs)}]")
    print(f"\n{load_text()}")


if __name__ == "__main__":
    main()
