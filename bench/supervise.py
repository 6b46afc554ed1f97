"""Supervision speed: respawn latency, start-up of 50 workers, idle cost, stop time.

    .venv/bin/python bench/supervise.py [--workers 50] [--kills 50] [--idle 30]

One ``procd run`` with a stage of N idle producer processes (restart on failure, backoff 0):
- start: pipeline_starting -> pipeline_ready (every worker has reported ready);
- respawn: SIGKILL of a random worker -> worker_spawned of its replacement (the kill is timed by
  this script just before ``os.kill``; the spawn by the supervisor's record), median and p95;
- idle: the supervisor's context switches (voluntary + involuntary, /proc) over the idle period,
  and its RSS at the end;
- stop: SIGTERM -> every worker gone and procd exited.
Targets (issue 3): respawn median <= 5 ms and p95 <= 10 ms, start <= 0.5 s, no periodic wake-ups
and RSS <= 25 MiB when idle, stop <= 100 ms. supervisord and circus are not installed here, so
no side-by-side figures for them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

STAGES = """
import time

def idle():
    while True:
        time.sleep(3600)
        yield None
"""

PIPELINE = """
[pipeline]
name = "supervise-bench"
stop_timeout = "5s"

[stages.idle]
function = "benchidle:idle"
processes = {workers}
restart = {{ policy = "on-failure", max = 1000, within = "60s", backoff = "0s" }}
"""


def _ts(record: dict) -> float:
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def _records(path: str) -> list[dict]:
    """Complete records only: a reader can see the end of a line that is still being written."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.endswith("\n")]


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.split(":", 1) for line in fh)


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.001)
    raise TimeoutError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        with open(os.path.join(workdir, "benchidle.py"), "w") as fh:
            fh.write(STAGES)
        pipeline = os.path.join(workdir, "bench.toml")
        with open(pipeline, "w") as fh:
            fh.write(PIPELINE.format(workers=args.workers))
        log = os.path.join(workdir, "log.jsonl")
        proc = subprocess.Popen(
            [sys.executable, "-m", "procd", "run", pipeline, "--log-file", log],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(lambda: os.path.exists(log) and any(r["event"] == "pipeline_ready" for r in _records(log)))
            records = _records(log)
            start = _ts(next(r for r in records if r["event"] == "pipeline_ready")) - _ts(records[0])
            live = {r["worker"]: r["pid"] for r in records if r["event"] == "worker_spawned"}

            latencies = []
            for _ in range(args.kills):
                index = random.randrange(args.workers)
                seen = len(_records(log))
                killed_at = time.time()
                os.kill(live[index], signal.SIGKILL)

                def replaced(seen: int = seen, index: int = index) -> list[dict]:
                    return [r for r in _records(log)[seen:] if r["event"] == "worker_spawned" and r["worker"] == index]

                new = _wait_for(replaced)[0]
                latencies.append((_ts(new) - killed_at) * 1000)
                live[index] = new["pid"]
                time.sleep(0.02)

            time.sleep(0.5)
            before = _status(proc.pid)
            time.sleep(args.idle)
            after = _status(proc.pid)
            switches = sum(
                int(after[k]) - int(before[k]) for k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
            )
            rss_kib = int(after["VmRSS"].split()[0])

            stop_at = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            stop_ms = (time.perf_counter() - stop_at) * 1000
            leftover = [pid for pid in live.values() if os.path.exists(f"/proc/{pid}")]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    latencies.sort()
    p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)]
    print(f"workers: {args.workers}, kills: {args.kills}, idle: {args.idle:g} s, cores: {os.cpu_count()}")
    print(f"start, {args.workers} workers until all ready : {start * 1000:8.1f} ms   (target <= 500 ms)")
    print(f"respawn after SIGKILL, median          : {statistics.median(latencies):8.2f} ms   (target <= 5 ms)")
    print(f"respawn after SIGKILL, p95             : {p95:8.2f} ms   (target <= 10 ms)")
    print(f"supervisor context switches while idle : {switches:8d}      (target 0: no periodic wake-ups)")
    print(f"supervisor RSS                         : {rss_kib / 1024:8.1f} MiB  (target <= 25 MiB)")
    print(f"SIGTERM -> all workers gone, exit {code}    : {stop_ms:8.1f} ms   (target <= 100 ms)")
    print(f"workers left behind                    : {len(leftover)}")


if __name__ == "__main__":
    main()
