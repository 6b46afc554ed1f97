"""SIGTERM at a random moment of ``procd run``'s start-up: how often does it end by the signal?

    .venv/bin/python bench/start_signal.py [--trials 30] [--max-delay 0.3] [--seed 1]

Each trial starts ``python -m procd run`` on an endless two-stage pipeline, sleeps a random
0..MAX-DELAY seconds, sends SIGTERM and records the exit status. procd holds its stop signals
from its first line of Python, so only a signal within the interpreter's own start-up can end it
by the signal (status -15); the delays of those trials are printed.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = """
import time

def ticks():
    n = 0
    while True:
        yield n
        n += 1
        time.sleep(0.01)

def sink(n):
    pass
"""
PIPELINE = '[stages.ticks]\nfunction = "st:ticks"\n[stages.sink]\nfunction = "st:sink"\ninputs = ["ticks"]\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--max-delay", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rand = random.Random(args.seed)
    statuses: collections.Counter[int] = collections.Counter()
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        (work / "st.py").write_text(STAGES)
        (work / "p.toml").write_text(PIPELINE)
        for _ in range(args.trials):
            proc = subprocess.Popen(
                [sys.executable, "-m", "procd", "run", "p.toml", "--control", str(work / "c.sock")],
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            delay = rand.uniform(0, args.max_delay)
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            status = proc.wait()
            statuses[status] += 1
            if status < 0:
                print(f"ended by signal {-status} (SIGTERM sent {delay * 1000:.0f} ms after the start)")
    print("exit statuses:", dict(sorted(statuses.items())))


if __name__ == "__main__":
    main()
