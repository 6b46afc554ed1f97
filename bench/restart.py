"""Restart speed: SIGKILL of a stage's process → its replacement exists, procd against a
hand-written minimal SIGCHLD supervisor, side by side in one run.

    .venv/bin/python bench/restart.py [--quick] [--kills 50] [--processes 4]

Measured from outside through /proc, the way bench/supervise.py does (polled every 0.2 ms):
- command stage (``command = ["sleep", "3600"]``, reading from an idle producer): SIGKILL the
  program (a grandchild of the supervisor, under its bridge) → a new process named ``sleep``
  exists (its exec is done);
- function stage (a forked Python generator that sleeps): SIGKILL the worker → a new child of the
  supervisor exists;
- the anchor: ``MINIMAL_SUPERVISOR`` below, about 40 lines of Python (SIGCHLD through
  ``set_wakeup_fd``, ``waitpid(WNOHANG)`` in a loop, ``fork`` + ``execvp``), run twice: exec'ing
  ``sleep`` (against the command stage) and forking a Python sleeper (against the function stage).
Restart policy on-failure with no backoff. Targets (issue 12): command stage median <= 5 ms and
p95 <= 8 ms; function stage median <= 3 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from collections.abc import Callable

from harness import Pipeline, Script
from procfs import children, comm, wait_for
from report import Row, median, percentile, print_rows, ratio

MINIMAL_SUPERVISOR = """
    import ctypes
    import os
    import select
    import signal
    import sys
    import time

    mode, count = sys.argv[1], int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)

    def start():
        pid = os.fork()
        if pid == 0:
            try:
                libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with this supervisor
                if mode == "exec":
                    os.execvp("sleep", ["sleep", "3600"])
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                while True:
                    time.sleep(3600)
            finally:
                os._exit(127)
        return pid

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    for _ in range(count):
        start()
    print("ready", flush=True)
    while True:
        select.select([wake_r], [], [])
        os.read(wake_r, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            start()
"""

STAGES = """
    import time

    def idle(shard=None):  # several processes of a producer each take a shard (and ignore it)
        while True:
            time.sleep(3600)
            yield None
"""

RESTART = 'restart = { policy = "on-failure", max = 1000000, within = "60s", backoff = "0s" }'


def kill_and_wait(programs: Callable[[], set[int]], wanted: int, kills: int) -> list[float]:
    """SIGKILL a random program ``kills`` times; ms from each kill until a new program exists."""
    wait_for(lambda: len(programs()) >= wanted, timeout=30, interval=0.001)
    time.sleep(0.2)
    latencies = []
    for _ in range(kills):
        before = programs()
        victim = random.choice(sorted(before))
        killed = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda before=before: programs() - before, timeout=30)
        latencies.append((time.perf_counter() - killed) * 1000)
        wait_for(lambda: len(programs()) >= wanted, timeout=30, interval=0.001)
        time.sleep(0.02)
    return latencies


def programs_named(name: str, parents: Callable[[], set[int]]) -> Callable[[], set[int]]:
    """Children of ``parents()`` whose command name is ``name`` (that is: exec is done)."""

    def find() -> set[int]:
        return {pid for parent in parents() for pid in children(parent) if comm(pid) == name}

    return find


def procd_restarts(kills: int, processes: int, *, command: bool) -> list[float]:
    if command:
        # A producing command may run in 1 process only (each would yield every item): the
        # command stage reads from an idle producer instead, which never sends it anything.
        stage = '[stages.idle]\nfunction = "benchstages:idle"\n'
        stage += f'[stages.work]\ncommand = ["sleep", "3600"]\ninputs = ["idle"]\nprocesses = {processes}\n{RESTART}\n'
    else:
        stage = f'[stages.work]\nfunction = "benchstages:idle"\nprocesses = {processes}\n{RESTART}\n'
    with Pipeline(stage, STAGES, name="bench-restart") as pipeline:
        pipeline.start()
        pipeline.event("pipeline_ready")
        supervisor = pipeline.pid

        def workers() -> set[int]:
            return children(supervisor)

        programs = programs_named("sleep", workers) if command else workers
        latencies = kill_and_wait(programs, processes, kills)
        pipeline.remember()
        return latencies


def anchor_restarts(kills: int, processes: int, *, command: bool) -> list[float]:
    with Script(MINIMAL_SUPERVISOR, "minisup.py") as script:
        proc = script.start("exec" if command else "fork", str(processes))
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the minimal supervisor did not start")

        def workers() -> set[int]:
            return children(proc.pid)

        programs = programs_named("sleep", lambda: {proc.pid}) if command else workers
        latencies = kill_and_wait(programs, processes, kills)
        script.remember()
        return latencies


def measure(quick: bool = False, kills: int | None = None, processes: int | None = None) -> list[Row]:
    kills = kills or (5 if quick else 50)
    processes = processes or (2 if quick else 4)
    rows = []
    for command in (True, False):
        mine = procd_restarts(kills, processes, command=command)
        theirs = anchor_restarts(kills, processes, command=command)
        m50, m95 = median(mine), percentile(mine, 0.95)
        a50, a95 = median(theirs), percentile(theirs, 0.95)
        rows.append(
            Row(
                key="restart_command" if command else "restart_function",
                measure=f"SIGKILL of a {'command' if command else 'function'} stage's "
                f"{'program' if command else 'worker'} -> replacement exists ({kills} kills)",
                procd=f"median {m50:.2f} ms, p95 {m95:.2f} ms",
                anchor=f"minimal SIGCHLD supervisor ({'fork+exec' if command else 'fork'}) "
                f"median {a50:.2f}, p95 {a95:.2f} ms",
                ratio=f"{ratio(m50, a50)} median",
                target="median <= 5 ms, p95 <= 8 ms" if command else "median <= 3 ms",
                value=m50,
                met=(m50 <= 5 and m95 <= 8) if command else m50 <= 3,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 kills of 2 processes: checks that it runs")
    parser.add_argument("--kills", type=int, help="kills per stage kind (default 50)")
    parser.add_argument("--processes", type=int, help="processes per stage (default 4)")
    args = parser.parse_args()
    print_rows(measure(args.quick, args.kills, args.processes))


if __name__ == "__main__":
    sys.exit(main())
