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
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

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


def run(
    count: int, workdir: str, url: str | None, second_daemon: bool, codec: str = "json", batch: int = 256
) -> tuple[float, float]:
    with open(os.path.join(workdir, "benchstages.py"), "w") as fh:
        fh.write(STAGES)
    defaults = ""
    if url is not None:
        defaults = f'[defaults]\nqueue = {{ backend = "redis", url = "{url}", codec = "{codec}", batch = {batch} }}'
    path = os.path.join(workdir, "bench.toml")
    with open(path, "w") as fh:
        fh.write(PIPELINE.format(count=count, defaults=defaults, processes=1 if second_daemon else 2))
    logs = [os.path.join(workdir, name) for name in ("a.log", "b.log")]
    for log in logs:
        if os.path.exists(log):
            os.unlink(log)
    commands = [[sys.executable, "-m", "procd", "run", path, "--log-file", logs[0], "--control", f"{workdir}/a.sock"]]
    if second_daemon:
        commands.append(
            [
                sys.executable,
                "-m",
                "procd",
                "run",
                path,
                "--log-file",
                logs[1],
                "--control",
                f"{workdir}/b.sock",
                "--stages",
                "transform",
            ]
        )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="items per entry on the redis queues")
    args = parser.parse_args()
    variants = {
        "local queues, one daemon": (False, False, "json"),
        "redis queues, one daemon": (True, False, "json"),
        "redis queues, two daemons": (True, True, "json"),
        "redis, pickle, two daemons": (True, True, "pickle"),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as workdir:
        url, pid = start_redis(workdir)
        try:
            for _ in range(args.repeat):
                for name, (redis, second, codec) in variants.items():
                    runs[name].append(run(args.items, workdir, url if redis else None, second, codec, args.batch))
        finally:
            os.kill(pid, signal.SIGTERM)
    n = args.items
    print(
        f"items: {n}, runs: {args.repeat} (medians), redis batch {args.batch}, cores: {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':28}  end to end                   | inside the pipeline")
    for name, results in runs.items():
        total = statistics.median(r[0] for r in results)
        inside = statistics.median(r[1] for r in results)
        print(f"{name:28}: {n / total:10,.0f} items/s ({total:.3f} s) | {n / inside:10,.0f} items/s ({inside:.3f} s)")
    print(
        "target: redis >= 150,000 items/s with two consumer processes; anchor: redis-py one record per entry, 22-27k/s"
    )


if __name__ == "__main__":
    main()
