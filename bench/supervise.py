"""Supervision speed, side by side: procd, and supervisord and circus when they are installed.

    .venv/bin/python bench/supervise.py [--workers 50] [--kills 50] [--idle 30] [--others BIN_DIR]

Each supervisor runs N idle processes with restart on exit and no delay. All three are measured
the same way, from outside, through /proc: a supervised process is a child of the supervisor.
- start: launch -> all N children exist;
- respawn: SIGKILL of a random child -> a new child exists (polled every 0.2 ms), median, p95;
- idle: the supervisor's context switches over the idle period (a periodic tick shows up here),
  and its RSS;
- stop: SIGTERM -> the supervisor has exited and every child is gone.
procd's processes are a function stage (forked Python); supervisord's and circus's run
/bin/sleep. ``--others`` names a bin directory holding supervisord and circusd (for example a
virtualenv made for the bench: ``python3 -m venv /tmp/benchenv && /tmp/benchenv/bin/pip install
supervisor circus``). Targets (issue 3): respawn median <= 5 ms and p95 <= 10 ms, start <= 0.5 s,
no periodic wake-ups and RSS <= 25 MiB when idle, stop <= 100 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

from procfs import children, wait_for


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.split(":", 1) for line in fh)


@dataclass
class Figures:
    start_ms: float
    respawn_median_ms: float
    respawn_p95_ms: float
    idle_switches: int
    rss_mib: float
    stop_ms: float
    left_behind: int


def measure(argv: list[str], cwd: str, workers: int, kills: int, idle_s: float) -> Figures:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(children(proc.pid)) >= workers, timeout=60, interval=0.001)
        start_ms = (time.perf_counter() - started) * 1000
        time.sleep(1.0)  # let start-up settle (circus warms up, supervisord marks RUNNING)
        latencies = []
        for _ in range(kills):
            before = children(proc.pid)
            victim = random.choice(sorted(before))
            killed = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda before=before, victim=victim: children(proc.pid) - before - {victim}, timeout=30)
            latencies.append((time.perf_counter() - killed) * 1000)
            wait_for(lambda: len(children(proc.pid)) >= workers, timeout=30, interval=0.001)
            time.sleep(0.02)
        time.sleep(1.0)
        first = status(proc.pid)
        time.sleep(idle_s)
        last = status(proc.pid)
        switches = sum(int(last[k]) - int(first[k]) for k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        rss = int(last["VmRSS"].split()[0]) / 1024
        pids = children(proc.pid)
        stopping = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=30, interval=0.001)
        stop_ms = (time.perf_counter() - stopping) * 1000
        left = [p for p in pids if os.path.exists(f"/proc/{p}")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    latencies.sort()
    return Figures(
        start_ms,
        statistics.median(latencies),
        latencies[max(0, int(len(latencies) * 0.95) - 1)],
        switches,
        rss,
        stop_ms,
        len(left),
    )


def procd_argv(workdir: str, workers: int) -> list[str]:
    with open(os.path.join(workdir, "benchidle.py"), "w") as fh:
        # a producer in many processes takes a shard (its share of nothing)
        fh.write("import time\n\ndef idle(shard):\n    while True:\n        time.sleep(3600)\n        yield None\n")
    with open(os.path.join(workdir, "bench.toml"), "w") as fh:
        fh.write(
            textwrap.dedent(
                f"""
                [pipeline]
                name = "supervise-bench"
                stop_timeout = "5s"
                [stages.idle]
                function = "benchidle:idle"
                processes = {workers}
                restart = {{ policy = "on-failure", max = 1000, within = "60s", backoff = "0s" }}
                """
            )
        )
    return [sys.executable, "-m", "procd", "run", "bench.toml", "--control", os.path.join(workdir, "c.sock")]


def supervisord_argv(workdir: str, workers: int, binary: str) -> list[str]:
    with open(os.path.join(workdir, "supervisord.conf"), "w") as fh:
        fh.write(
            textwrap.dedent(
                f"""
                [supervisord]
                nodaemon=true
                logfile={workdir}/supervisord.log
                pidfile={workdir}/supervisord.pid
                [program:idle]
                command=/bin/sleep 3600
                numprocs={workers}
                process_name=%(program_name)s_%(process_num)02d
                autorestart=true
                startsecs=0
                startretries=1000
                """
            )
        )
    return [binary, "-c", os.path.join(workdir, "supervisord.conf")]


def circusd_argv(workdir: str, workers: int, binary: str) -> list[str]:
    with open(os.path.join(workdir, "circus.ini"), "w") as fh:
        fh.write(
            textwrap.dedent(
                f"""
                [circus]
                endpoint = tcp://127.0.0.1:{random.randrange(20000, 30000)}
                pubsub_endpoint = tcp://127.0.0.1:{random.randrange(30000, 40000)}
                statsd = false
                [watcher:idle]
                cmd = /bin/sleep 3600
                numprocesses = {workers}
                warmup_delay = 0
                respawn = true
                """
            )
        )
    return [binary, os.path.join(workdir, "circus.ini")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--others", metavar="BIN_DIR", help="where supervisord and circusd are")
    args = parser.parse_args()
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory() as workdir:
        results["procd"] = measure(procd_argv(workdir, args.workers), workdir, args.workers, args.kills, args.idle)
        for name, make in (("supervisord", supervisord_argv), ("circusd", circusd_argv)):
            binary = shutil.which(name, path=args.others) if args.others else shutil.which(name)
            if binary is None:
                print(f"{name}: not installed, not measured")
                continue
            results[name] = measure(make(workdir, args.workers, binary), workdir, args.workers, args.kills, args.idle)
    names = list(results)
    print(f"workers: {args.workers}, kills: {args.kills}, idle: {args.idle:g} s, cores: {os.cpu_count()}")
    print(f"{'':40}" + "".join(f"{n:>14}" for n in names) + "   target (procd)")
    rows = (
        ("start, all workers running (ms)", "start_ms", "{:14.1f}", "<= 500"),
        ("respawn after SIGKILL, median (ms)", "respawn_median_ms", "{:14.2f}", "<= 5"),
        ("respawn after SIGKILL, p95 (ms)", "respawn_p95_ms", "{:14.2f}", "<= 10"),
        (f"context switches in {args.idle:g} s idle", "idle_switches", "{:14d}", "0"),
        ("supervisor RSS (MiB)", "rss_mib", "{:14.1f}", "<= 25"),
        ("SIGTERM -> all gone (ms)", "stop_ms", "{:14.1f}", "<= 100"),
        ("processes left behind", "left_behind", "{:14d}", "0"),
    )
    for label, key, fmt, target in rows:
        print(f"{label:40}" + "".join(fmt.format(getattr(results[n], key)) for n in names) + f"   {target}")


if __name__ == "__main__":
    main()
