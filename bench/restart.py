"""Restart speed: SIGKILL of a stage's process → its replacement exists, procd against a
hand-written minimal SIGCHLD supervisor, side by side in one run.

    .venv/bin/python bench/restart.py [--quick] [--kills 50] [--processes 4] [--start-method M]

Measured from outside through /proc, the way bench/supervise.py does (polled every 0.2 ms):
- command stage (``command = ["sleep", "3600"]``, reading from an idle producer): SIGKILL the
  program (a grandchild of the supervisor, under its bridge) → a new process named ``sleep``
  exists (its exec is done);
- function stage (a forked Python generator that sleeps): SIGKILL the worker → a new child of the
  supervisor exists;
- the anchor: ``MINIMAL_SUPERVISOR`` below, about 40 lines of Python (SIGCHLD through
  ``set_wakeup_fd``, ``waitpid(WNOHANG)`` in a loop, ``fork`` + ``execvp``), run twice: exec'ing
  ``sleep`` (against the command stage) and forking a Python sleeper (against the function stage).
  procd and the anchor run at the same time, and the kills alternate between them (one of
  procd's, one of the anchor's, ...), so that the machine's load, which changes from second to
  second on a shared machine, falls on both sides alike.
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


def kill_one(programs: Callable[[], set[int]], wanted: int) -> float:
    """SIGKILL one of ``programs()`` at random; ms from the kill until a new program exists (and
    then wait, untimed, until all ``wanted`` are back)."""
    before = programs()
    victim = random.choice(sorted(before))
    killed = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: programs() - before, timeout=30)
    latency = (time.perf_counter() - killed) * 1000
    wait_for(lambda: len(programs()) >= wanted, timeout=30, interval=0.001)
    return latency


def programs_named(name: str, parents: Callable[[], set[int]]) -> Callable[[], set[int]]:
    """Children of ``parents()`` whose command name is ``name`` (that is: exec is done)."""

    def find() -> set[int]:
        return {pid for parent in parents() for pid in children(parent) if comm(pid) == name}

    return find


def procd_stages(processes: int, *, command: bool, start_method: str | None) -> str:
    """The pipeline's body: ``processes`` sleepers in one stage, restarted at once when killed."""
    stage = f'start_method = "{start_method}"\n' if start_method else ""  # still in [pipeline]
    if command:
        # A producing command may run in 1 process only (each would yield every item): the
        # command stage reads from an idle producer instead, which never sends it anything.
        stage += '[stages.idle]\nfunction = "benchstages:idle"\n'
        stage += f'[stages.work]\ncommand = ["sleep", "3600"]\ninputs = ["idle"]\nprocesses = {processes}\n{RESTART}\n'
    else:
        stage += f'[stages.work]\nfunction = "benchstages:idle"\nprocesses = {processes}\n{RESTART}\n'
    return stage


def restarts(
    kills: int, processes: int, *, command: bool, start_method: str | None = None
) -> tuple[list[float], list[float]]:
    """procd's and the minimal supervisor's restart times (ms), ``kills`` each. Both run at the
    same time, idle but for the kills, which alternate between them: a change in the machine's
    load falls on both sides."""
    body = procd_stages(processes, command=command, start_method=start_method)
    with Pipeline(body, STAGES, name="bench-restart") as pipeline, Script(MINIMAL_SUPERVISOR, "minisup.py") as script:
        pipeline.start()
        proc = script.start("exec" if command else "fork", str(processes))
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the minimal supervisor did not start")
        pipeline.event("pipeline_ready")
        supervisor = pipeline.pid

        def workers() -> set[int]:
            return children(supervisor)

        def anchor_workers() -> set[int]:
            return children(proc.pid)

        ours = programs_named("sleep", workers) if command else workers
        theirs = programs_named("sleep", lambda: {proc.pid}) if command else anchor_workers
        for programs in (ours, theirs):
            wait_for(lambda programs=programs: len(programs()) >= processes, timeout=30, interval=0.001)
        time.sleep(0.2)
        mine, anchor = [], []
        for _ in range(kills):
            mine.append(kill_one(ours, processes))
            time.sleep(0.01)
            anchor.append(kill_one(theirs, processes))
            time.sleep(0.01)
        pipeline.remember()
        script.remember()
        return mine, anchor


def measure(
    quick: bool = False, kills: int | None = None, processes: int | None = None, start_method: str | None = None
) -> list[Row]:
    kills = kills or (5 if quick else 50)
    processes = processes or (2 if quick else 4)
    rows = []
    for command in (True, False):
        mine, theirs = restarts(kills, processes, command=command, start_method=start_method)
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
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), help="procd's (default: its own)")
    args = parser.parse_args()
    print_rows(measure(args.quick, args.kills, args.processes, args.start_method))


if __name__ == "__main__":
    sys.exit(main())
