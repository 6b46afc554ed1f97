"""Every benchmark of issue 12, one after another, and one table: each row side by side with its
anchor (measured in the same run), the ratio, the target, and the machine it ran on.

    .venv/bin/python bench/all.py [--quick] [--only cpu,latency,restart,startup]

``--quick`` uses small counts (well under a minute): it checks that every benchmark still runs,
and its figures mean little. Each benchmark also runs alone (``bench/latency.py`` and so on), with
its own options for longer runs.
"""

from __future__ import annotations

import argparse
import sys
import time

import cpu
import latency
import restart
import startup
from procfs import ForeignCpu, load_text
from report import Row, header, table

BENCHMARKS = {
    "cpu": cpu.measure,
    "latency": latency.measure,
    "restart": restart.measure,
    # --quick (the test) skips the pip-installed procd: it would fetch procd's dependencies
    "startup": lambda quick: startup.measure(quick, installed=not quick),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: checks that every benchmark runs")
    parser.add_argument("--only", help=f"a comma-separated subset of: {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    print(header(), flush=True)
    rows: list[Row] = []
    for name in names:
        started = time.perf_counter()
        with ForeignCpu() as foreign:
            got = BENCHMARKS[name](args.quick)
        rows += got
        print(
            f"{name}: {len(got)} rows in {time.perf_counter() - started:.1f} s; other processes used "
            f"{foreign.share * 100:.0f}% of the machine's CPU meanwhile; {load_text()}",
            flush=True,
        )
    print()
    print(table(rows))
    print()
    print(f"at end: {load_text()}")
    print(f"rows: {' '.join(r.key + '=' + format(r.value, '.6g') for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
