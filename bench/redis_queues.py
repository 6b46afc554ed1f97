"""Redis queues against local ones, side by side in one run: the 1 -> 2 -> 1 pipeline of
bench/throughput.py (200,000 small dicts), with its two inputs on the local backend, then on a
Redis stream (one daemon), then on Redis with the transform's two processes on a second daemon
(``procd run --stages transform``), as a second host would run them.

    .venv/bin/python bench/redis_queues.py [--items 200000] [--repeat 3]

A redis-server (Debian's) is started on a unix socket in a temporary directory and stopped at the
end; nothing else on the network. Reported: items/s inside the pipeline (pipeline_starting to
pipeline_stopped of the daemon that runs the sink) and end to end (every daemon started to every
daemon ended), medians. The issue's anchor: redis-py XADD -> XREADGROUP -> XACK, one record per
entry, reached about 22-27k records/s per client; the target is >= 150,000 items/s with two
consumer processes.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import linecache
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from profile import FRAME, ROLE, py_spy
from typing import Any

from throughput import STAGES, inside_seconds

PIPELINE = """
[pipeline]
name = "bench-redis"
{defaults}

[stages.produce]
function = "benchstages:produce"
options = {{ count = {count} }}

[stages.transform]
function = "benchstages:transform"
inputs = ["produce"]
processes = {processes}

[stages.sink]
function = "benchstages:Sink"
inputs = ["transform"]
options = {{ count = {count} }}
"""


def start_redis(directory: str) -> tuple[str, int]:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    socket_path = os.path.join(directory, "redis.sock")
    pidfile = os.path.join(directory, "redis.pid")
    subprocess.run(
        [
            server,
            "--port",
            "0",
            "--unixsocket",
            socket_path,
            "--save",
            "",
            "--daemonize",
            "yes",
            "--pidfile",
            pidfile,
            "--dir",
            directory,
            "--logfile",
            os.path.join(directory, "redis.log"),
        ],
        check=True,
        timeout=10,
    )
    deadline = time.monotonic() + 10
    while not (os.path.exists(socket_path) and os.path.exists(pidfile)):
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.01)
    with open(pidfile) as fh:
        return f"unix://{socket_path}", int(fh.read())


def daemon(path: str, log: str, control: str, *extra: str) -> list[str]:
    """The command of one ``procd run`` of the bench's pipeline file."""
    return [sys.executable, "-m", "procd", "run", path, "--log-file", log, "--control", control, *extra]


def run(
    count: int,
    workdir: str,
    url: str | None,
    second_daemon: bool,
    codec: str = "json",
    batch: int | None = None,
    wrap: list[str] | None = None,
) -> tuple[float, float]:
    with open(os.path.join(workdir, "benchstages.py"), "w") as fh:
        fh.write(STAGES)
    defaults = ""
    if url is not None:
        size = "" if batch is None else f", batch = {batch}"
        defaults = f'[defaults]\nqueue = {{ backend = "redis", url = "{url}", codec = "{codec}"{size} }}'
    path = os.path.join(workdir, "bench.toml")
    with open(path, "w") as fh:
        fh.write(PIPELINE.format(count=count, defaults=defaults, processes=1 if second_daemon else 2))
    logs = [os.path.join(workdir, name) for name in ("a.log", "b.log")]
    for log in logs:
        if os.path.exists(log):
            os.unlink(log)
    commands = [[*(wrap or []), *daemon(path, logs[0], f"{workdir}/a.sock")]]
    if second_daemon:
        commands.append(daemon(path, logs[1], f"{workdir}/b.sock", "--stages", "transform"))
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.perf_counter() - start
    assert codes == [0] * len(procs), codes
    return elapsed, inside_seconds(logs[0])


# the procd that the daemons run (PYTHONPATH may point at another tree's): its source lines
_SPEC = importlib.util.find_spec("procd")
PACKAGE = os.path.dirname(os.path.dirname(_SPEC.origin)) if _SPEC and _SPEC.origin else ""


def kind(frames: list[str]) -> str:
    """What a sample's process was doing, from its stack (innermost frame last)."""
    leaf = FRAME.match(frames[-1])
    file, func = (leaf["file"], leaf["func"]) if leaf else (frames[-1], "")
    text = linecache.getline(os.path.join(PACKAGE, file), int(leaf["line"])) if leaf else ""
    if "redis/" in file and func.endswith(("read_from_socket", "_socket_can_read", "recv_into", "recv")):
        return "waiting for a Redis reply (socket read)"
    if "redis/" in file and func.endswith("send_packed_command"):
        return "sending a command (socket write)"
    if "redis/" in file or "_parsers" in file:
        return "redis-py (packing commands, parsing replies)"
    if "json/" in file or "pickle" in func:
        return "json / pickle (the codec)"
    if file == "benchstages.py":
        return "stage code (the user's)"
    if "sleep(" in text:
        return "sleeping (backpressure: the queue is full)"
    if "select" in func or "select(" in text:
        return "select (waiting)"
    if "procd/transport/" in file:
        return "procd transport (slot, backlog, bookkeeping)"
    if file.startswith("procd/"):
        return "procd's per-item Python"
    return "other (start-up, stdlib)"


def profile(count: int, url: str, workdir: str, rate: int, batch: int | None) -> None:
    """py-spy (``--idle``: blocked time counts) of every process of the one-daemon Redis run."""
    raw = os.path.join(workdir, "raw.txt")
    wrap = [
        py_spy(),
        "record",
        "--idle",
        "--subprocesses",
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        raw,
        "--",
    ]
    run(count, workdir, url, False, batch=batch, wrap=wrap)
    by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lines: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(raw) as fh:
        for text in fh:
            stack, _, number = text.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if any("Ticker._" in f for f in frames):
                continue  # the worker's clock thread, asleep between ticks
            role = next((m["stage"] for f in frames if (m := ROLE.match(f))), "supervisor")
            by_role[role][kind(frames)] += int(number)
            procd = [f for f in frames if "(procd/" in f]
            lines[role][f"{procd[-1] if procd else '-'}  <  {frames[-1]}"] += int(number)
    print(
        f"py-spy --idle, {rate} Hz, {count:,} items, redis one daemon, batch {batch or 'default'}; "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for role in ("produce", "transform", "sink", "supervisor"):
        counter = by_role.get(role)
        if not counter:
            continue
        total = sum(counter.values())
        print(f"\n{role}: {total} samples ({total / rate:.2f} s of wall time, all its processes)")
        for what, number in counter.most_common():
            print(f"  {number / total * 100:5.1f}%  {what}")
        for where, number in lines[role].most_common(8):
            print(f"         {number / total * 100:5.1f}%  {where[:150]}")


def round_trips(url: str, batches: int) -> None:
    """CPU and wall time of one client's ``Stream.send`` (an ``XADD`` of a 256-dict JSON batch)
    and ``Stream.read`` with the acknowledgement of the previous entry, against an idle server."""
    import json

    import redis as redis_py

    from procd.transport.redisstream import Names, Stream, connect

    stream = Stream(connect(url), Names("bench:round-trips", "g"))
    stream.create()
    payload = json.dumps([{"id": i, "name": f"user{i}", "score": i % 97} for i in range(256)]).encode()

    def timed(name: str, step: Any) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            step()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"{name:45}: {cpu / batches * 1e6:6.0f} us CPU, {wall / batches * 1e6:6.0f} us wall per batch")

    handled: list[str] = []

    def read() -> None:
        entry = stream.read("c", acknowledge=tuple(handled[-1:]))
        assert entry is not None
        handled.append(entry.id)

    print(f"redis-py {redis_py.__version__}, hiredis: {redis_py.utils.HIREDIS_AVAILABLE}, load {os.getloadavg()}")
    timed("send (XADD)", lambda: stream.send([(payload, 256)], batches + 1))
    timed("read with the last one's acknowledgement", read)


def cpu_seconds(redis_pid: int) -> float:
    """CPU time so far of every process this bench has waited for (the daemons and, through
    them, their workers) and of the redis-server."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(f"/proc/{redis_pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return usage.ru_utime + usage.ru_stime + server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, help="items per entry on the redis queues (default: procd's)")
    parser.add_argument("--profile", action="store_true", help="py-spy every process of one redis run instead")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (with --profile)")
    parser.add_argument("--round-trips", action="store_true", help="time one client's send and read instead")
    args = parser.parse_args()
    if args.round_trips:
        with tempfile.TemporaryDirectory() as workdir:
            url, pid = start_redis(workdir)
            try:
                round_trips(url, 3000)
            finally:
                os.kill(pid, signal.SIGTERM)
        return
    if args.profile:
        with tempfile.TemporaryDirectory() as workdir:
            url, pid = start_redis(workdir)
            try:
                profile(args.items, url, workdir, args.rate, args.batch)
            finally:
                os.kill(pid, signal.SIGTERM)
        return
    variants = {
        "local queues, one daemon": (False, False, "json"),
        "redis queues, one daemon": (True, False, "json"),
        "redis queues, two daemons": (True, True, "json"),
        "redis, pickle, two daemons": (True, True, "pickle"),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as workdir:
        url, pid = start_redis(workdir)
        try:
            for _ in range(args.repeat):
                for name, (redis, second, codec) in variants.items():
                    cpu = cpu_seconds(pid)
                    total, inside = run(args.items, workdir, url if redis else None, second, codec, args.batch)
                    runs[name].append((total, inside, cpu_seconds(pid) - cpu))
        finally:
            os.kill(pid, signal.SIGTERM)
    n = args.items
    print(
        f"items: {n}, runs: {args.repeat} (medians), redis batch {args.batch or 'default'}, cores: {os.cpu_count()}, "
        f"load average before {load_before}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{'':28}  end to end                   | inside the pipeline          | CPU, all processes")
    for name, results in runs.items():
        total = statistics.median(r[0] for r in results)
        inside = statistics.median(r[1] for r in results)
        cpu = statistics.median(r[2] for r in results)
        print(
            f"{name:28}: {n / total:10,.0f} items/s ({total:.3f} s) | {n / inside:10,.0f} items/s ({inside:.3f} s) "
            f"| {cpu / n * 1e6:5.1f} us/item"
        )
    print(
        "target: redis >= 150,000 items/s with two consumer processes; anchor: redis-py one record per entry, 22-27k/s"
    )


if __name__ == "__main__":
    main()
