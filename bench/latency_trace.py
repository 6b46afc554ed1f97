"""Where a latency's time goes, and how many messages a fast producer sends: kernel tracepoints
(``perf record -a``) around one procd pipeline.

    .venv/bin/python bench/latency_trace.py [--shape direct|middle] [--producer function|command] [--items 1000]
    .venv/bin/python bench/latency_trace.py --messages [--items 200000]

Needs ``perf`` with access to tracepoints (``perf_event_paranoid`` <= 2 as root); traces the
whole machine, then keeps the events of the pipeline's workers (their pids from the
``worker_spawned`` records; a thread or program a worker starts counts as its ``+child``).

- Latency (the default): latency.py's pipeline at 100 items/s, every item's creation time and
  latency kept by the sink; the scheduler's switch and wake-up events on ``CLOCK_MONOTONIC`` (the
  items' clock). Prints per item and worker: time on a CPU, switch-ins, and time from being woken
  to running (waiting for a free CPU); then the slowest items, each with those waits and runs
  inside its own life (creation to arrival).
- ``--messages``: cpu.py's 3-stage pipeline (a fast producer, batches of 256); the ``sendmsg``
  calls of each stage's workers, one per message (a batch) sent downstream.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import cpu
import latency
from harness import Pipeline
from procfs import load_text

SCHED = ("sched:sched_switch", "sched:sched_waking", "sched:sched_process_fork")
SINK_KEEPS_TIMES = latency.STAGES.replace(
    'self.latencies.append(time.perf_counter() - item["t"])',
    'self.latencies.append((item["t"], time.perf_counter() - item["t"]))',
)


@contextmanager
def recording(events: tuple[str, ...]) -> Iterator[str]:
    """``perf record`` of ``events`` machine-wide for the block; yields the data file's path."""
    directory = tempfile.mkdtemp(prefix="procd-bench-perf-")
    path = os.path.join(directory, "perf.data")
    argv = ["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-o", path]
    for event in events:
        argv += ["-e", event]
    perf = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # perf is attached
        yield path
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)


def script(path: str) -> list[tuple[float, str, dict[str, str]]]:
    """(time s, event, fields) of every event recorded (``pid``: the acting process), then the
    data file goes."""
    try:
        out = subprocess.run(
            ["perf", "script", "-i", path, "-F", "pid,time,event,trace"], capture_output=True, text=True, check=True
        ).stdout
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    events = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        fields = dict(part.split("=", 1) for part in parts[3:] if "=" in part)
        fields["process"] = parts[0]
        events.append((float(parts[1].rstrip(":")), parts[2].rstrip(":"), fields))
    return events


def workers(records: list[dict[str, object]], events: list[tuple[float, str, dict[str, str]]]) -> dict[int, str]:
    """Stage name by pid, and ``STAGE+child`` for every thread or process a worker started."""
    names = {int(str(r["pid"])): str(r["stage"]) for r in records if r.get("event") == "worker_spawned"}
    for _t, event, fields in events:
        if event == "sched:sched_process_fork" and int(fields["pid"]) in names:
            names[int(fields["child_pid"])] = names[int(fields["pid"])].split("+")[0] + "+child"
    return names


def messages(count: int) -> None:
    with Pipeline(cpu.THREE_STAGES.format(count=count), cpu.STAGES, name="bench-messages") as pipeline:
        with recording(("syscalls:sys_enter_sendmsg",)) as path:
            pipeline.start()
            code = pipeline.wait(timeout=600)
        events = script(path)
        records = pipeline.records()
    if code != 0:
        raise RuntimeError(f"procd exited {code}")
    names = workers(records, [])
    sent = collections.Counter(names[int(f["process"])] for _t, _e, f in events if int(f["process"]) in names)
    print(f"{count:,} items, batches of 256; messages sent: {dict(sent)}; {load_text()}")


def trace(shape: str, producer: str, count: int) -> None:
    if producer == "command":
        toml = f'[stages.produce]\ncommand = ["{{python}}", "{{dir}}/producer.py", "{count}", "0.01", "0"]\n'
    else:
        toml = f'[stages.produce]\nfunction = "benchstages:paced"\noptions = {{ count = {count}, interval = 0.01 }}\n'
    upstream = "produce"
    if shape == "middle":
        toml += '[stages.middle]\nfunction = "benchstages:middle"\ninputs = ["produce"]\n'
        upstream = "middle"
    toml += f'[stages.sink]\nfunction = "benchstages:Sink"\ninputs = ["{upstream}"]\n'
    toml += 'options = { path = "{dir}/latencies.json" }\n'
    with Pipeline(toml, SINK_KEEPS_TIMES, name="bench-latency-trace") as pipeline:
        pipeline.write("producer.py", latency.COMMAND_PRODUCER)
        with recording(SCHED) as path:
            pipeline.start()
            code = pipeline.wait(timeout=count * latency.INTERVAL_S + 60)
        events = script(path)
        records = pipeline.records()
        items = [tuple(x) for x in json.loads((pipeline.dir / "latencies.json").read_text())][latency.WARM_UP :]
    if code != 0:
        raise RuntimeError(f"procd exited {code}")
    names = workers(records, events)
    # (time, what, pid): what is "woken", "on" (switched in) or "off" (switched out)
    moments = []
    for t, event, fields in events:
        if event == "sched:sched_waking" and int(fields["pid"]) in names:
            moments.append((t, "woken", int(fields["pid"])))
        elif event == "sched:sched_switch":
            if int(fields["next_pid"]) in names:
                moments.append((t, "on", int(fields["next_pid"])))
            if int(fields["prev_pid"]) in names:
                # switched out while runnable (R): preempted, so it waits for a CPU from here
                preempted = fields.get("prev_state", "").startswith("R")
                moments.append((t, "preempted" if preempted else "off", int(fields["prev_pid"])))
    moments.sort()

    def spent(start: float, end: float) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
        """ms waiting for a CPU (once woken, or preempted), ms on a CPU, and switch-ins, per worker,
        in [start, end]."""
        waited: dict[str, float] = collections.Counter()
        ran: dict[str, float] = collections.Counter()
        switched: dict[str, int] = collections.Counter()
        woken: dict[int, float] = {}
        since: dict[int, float] = {}
        for t, what, pid in moments:
            if t < start or t > end:
                continue
            name = names[pid]
            if what == "woken":
                woken[pid] = t
            elif what == "preempted":
                woken[pid] = t
                if pid in since:
                    ran[name] += (t - since.pop(pid)) * 1000
            elif what == "on":
                switched[name] += 1
                since[pid] = t
                if pid in woken:
                    waited[name] += (t - woken.pop(pid)) * 1000
            elif pid in since:
                ran[name] += (t - since.pop(pid)) * 1000
        return waited, ran, switched

    def show(values: dict[str, float], per: float = 1.0) -> str:
        return ", ".join(f"{k} {v / per:.3f}" for k, v in sorted(values.items()))

    ordered = sorted(latency_s for _t, latency_s in items)
    p50, p99 = (latency.percentile(ordered, q) * 1000 for q in (0.5, 0.99))
    print(f"{producer} producer, {shape}: {len(items)} items, p50 {p50:.2f} ms, p99 {p99:.2f} ms; {load_text()}")
    first, last = items[0][0], items[-1][0] + items[-1][1]
    waited, ran, switched = spent(first, last)
    print(f"  per item, ms on a CPU: {show(ran, len(items))}")
    print(f"  per item, switch-ins: {show({k: float(v) for k, v in switched.items()}, len(items))}")
    print(f"  per item, ms waiting for a CPU: {show(waited, len(items))}")
    print("  the slowest items (ms): latency | waiting for a CPU | on a CPU")
    for made, latency_s in sorted(items, key=lambda item: -item[1])[:12]:
        waited, ran, _switched = spent(made, made + latency_s)
        print(f"    {latency_s * 1000:7.2f} | {show(waited)} | {show(ran)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("direct", "middle"), default="direct")
    parser.add_argument("--producer", choices=("function", "command"), default="function")
    parser.add_argument("--items", type=int, help="items (default 1000; 200,000 with --messages)")
    parser.add_argument("--messages", action="store_true", help="count a fast producer's messages instead")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")
    if args.messages:
        messages(args.items or 200_000)
    else:
        trace(args.shape, args.producer, args.items or 1000)


if __name__ == "__main__":
    main()
