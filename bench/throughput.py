"""Throughput: the classic multiprocessing pattern against procd, on the same 3-stage pipeline.

    .venv/bin/python bench/throughput.py [--items 200000] [--repeat 3]

Pipeline: 1 producer -> 2 transform processes -> 1 sink, over small dict records. The classic
pattern is multiprocessing.Process workers joined by multiprocessing.Queue, one item per put,
None sentinels. procd runs the same stage code from a generated pipeline file, as a real
``procd run`` subprocess. Both sinks check that every record arrived (count and id checksum).
Reported: items/s end to end (process start to exit) and, for procd, inside the pipeline
(from pipeline_starting to pipeline_stopped in its log), and the ratio procd / classic.
The issue's target: procd at least 5x the classic pattern. procd also runs with
``redeliver = false`` (no in-flight tracking), to show what at-least-once delivery costs, and
with durable SQLite queues (``queue = { backend = "sqlite" }``) for the transform and the sink.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

STAGES = textwrap.dedent(
    """
    def produce(count):
        for i in range(count):
            yield {"id": i, "name": "user%d" % i, "score": i % 97}

    def transform(item):
        item["score2"] = item["score"] * 2
        item["tag"] = "even" if item["id"] % 2 == 0 else "odd"
        return item

    class Sink:
        def __init__(self, count):
            self.count = count
            self.seen = 0
            self.checksum = 0

        def __call__(self, item):
            self.seen += 1
            self.checksum += item["id"]

        def close(self):
            expected = self.count * (self.count - 1) // 2
            print("SINK %d %d %s" % (self.seen, self.checksum, self.seen == self.count and self.checksum == expected))
    """
)

PIPELINE = """
[pipeline]
name = "bench"

[stages.produce]
function = "benchstages:produce"
options = {{ count = {count} }}

[stages.transform]
function = "benchstages:transform"
inputs = ["produce"]
processes = 2
redeliver = {redeliver}
{transform_queue}

[stages.sink]
function = "benchstages:Sink"
inputs = ["transform"]
options = {{ count = {count} }}
redeliver = {redeliver}
{sink_queue}
"""


# -- the classic pattern -------------------------------------------------------------------------


def _classic_produce(out: mp.Queue, count: int, consumers: int) -> None:
    for i in range(count):
        out.put({"id": i, "name": f"user{i}", "score": i % 97})
    for _ in range(consumers):
        out.put(None)


def _classic_transform(inq: mp.Queue, out: mp.Queue) -> None:
    while (item := inq.get()) is not None:
        item["score2"] = item["score"] * 2
        item["tag"] = "even" if item["id"] % 2 == 0 else "odd"
        out.put(item)
    out.put(None)


def _classic_sink(inq: mp.Queue, producers: int, result: mp.Queue) -> None:
    seen = checksum = done = 0
    while done < producers:
        item = inq.get()
        if item is None:
            done += 1
            continue
        seen += 1
        checksum += item["id"]
    result.put((seen, checksum))


def classic_pipeline(count: int) -> float:
    ctx = mp.get_context("fork")
    q1, q2, result = ctx.Queue(10000), ctx.Queue(10000), ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_classic_produce, args=(q1, count, 2))]
    procs += [ctx.Process(target=_classic_transform, args=(q1, q2)) for _ in range(2)]
    procs += [ctx.Process(target=_classic_sink, args=(q2, 2, result))]
    for p in procs:
        p.start()
    seen, checksum = result.get()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    assert seen == count and checksum == count * (count - 1) // 2, (seen, checksum)
    return elapsed


def run_classic(count: int) -> tuple[float, float]:
    """The classic pattern as its own command, like procd: (end to end, inside the pipeline)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--classic-only", "--items", str(count)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return time.perf_counter() - start, float(proc.stdout.split()[-1])


# -- procd ---------------------------------------------------------------------------------------


def _ts(record: dict) -> float:
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def run_procd(count: int, workdir: str, redeliver: bool = True, sqlite: bool = False) -> tuple[float, float]:
    with open(os.path.join(workdir, "benchstages.py"), "w") as fh:
        fh.write(STAGES)
    pipeline = os.path.join(workdir, "bench.toml")
    with open(pipeline, "w") as fh:
        queues = {
            f"{stage}_queue": f'queue = {{ backend = "sqlite", path = "bench-{stage}.sqlite" }}' if sqlite else ""
            for stage in ("transform", "sink")
        }
        for stage in ("transform", "sink"):
            for suffix in ("", "-wal", "-shm"):
                path = os.path.join(workdir, f"bench-{stage}.sqlite{suffix}")
                if os.path.exists(path):
                    os.unlink(path)
        fh.write(PIPELINE.format(count=count, redeliver=str(redeliver).lower(), **queues))
    log = os.path.join(workdir, "bench.log")
    if os.path.exists(log):
        os.unlink(log)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "procd", "run", pipeline, "--log-file", log],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.returncode
    return elapsed, inside_seconds(log)


def inside_seconds(log: str) -> float:
    """Seconds from pipeline_starting to pipeline_stopped in ``log``, once the sink said that
    every record arrived."""
    with open(log) as fh:
        records = [json.loads(line) for line in fh]
    sink = [r["line"] for r in records if r.get("event") == "worker_output" and r["line"].startswith("SINK")]
    assert sink and sink[0].endswith("True"), sink
    first = next(r for r in records if r["event"] == "pipeline_starting")
    last = next(r for r in records if r["event"] == "pipeline_stopped")
    return _ts(last) - _ts(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--classic-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.classic_only:
        print(classic_pipeline(args.items))
        return
    runs: dict[str, list[float]] = {k: [] for k in ("ct", "ci", "pt", "pi", "nt", "ni", "st", "si")}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeat):
            total, inside = run_classic(args.items)
            runs["ct"].append(total)
            runs["ci"].append(inside)
            total, inside = run_procd(args.items, workdir)
            runs["pt"].append(total)
            runs["pi"].append(inside)
            total, inside = run_procd(args.items, workdir, redeliver=False)
            runs["nt"].append(total)
            runs["ni"].append(inside)
            total, inside = run_procd(args.items, workdir, sqlite=True)
            runs["st"].append(total)
            runs["si"].append(inside)
    n = args.items
    ct, ci, pt, pi, nt, ni, st, si = (
        statistics.median(runs[k]) for k in ("ct", "ci", "pt", "pi", "nt", "ni", "st", "si")
    )
    print(f"items: {n}, runs: {args.repeat} (medians), cores: {os.cpu_count()}")
    print("                                 end to end (a command, interpreter start included) | inside the pipeline")
    print(
        f"classic multiprocessing.Queue : {n / ct:12,.0f} items/s ({ct:.3f} s) | {n / ci:12,.0f} items/s ({ci:.3f} s)"
    )
    print(
        f"procd                         : {n / pt:12,.0f} items/s ({pt:.3f} s) | {n / pi:12,.0f} items/s ({pi:.3f} s)"
    )
    print(
        f"procd, redeliver = false      : {n / nt:12,.0f} items/s ({nt:.3f} s) | {n / ni:12,.0f} items/s ({ni:.3f} s)"
    )
    print(
        f"procd, sqlite queues          : {n / st:12,.0f} items/s ({st:.3f} s) | {n / si:12,.0f} items/s ({si:.3f} s)"
    )
    print(f"ratio procd / classic         : {ct / pt:12.1f}x                  | {ci / pi:12.1f}x   (target >= 5x)")
    print(
        f"cost of redelivery tracking   : {(1 - nt / pt) * 100:11.1f}%                  | "
        f"{(1 - ni / pi) * 100:11.1f}%   (target <= 10%)"
    )


if __name__ == "__main__":
    main()
