"""Stage projects: what a build costs, and what a cached environment adds to a ``procd run``.

    .venv/bin/python bench/build.py [--repeat 15] [--method forkserver] [--wheelhouse .wheelhouse]

In a temporary directory: a setuptools project (one package, no dependencies) and two copies of
one pipeline, identical but for where the stage code is: one names the project in ``packages``
(its workers run in the pipeline's own environment), the other imports the same module from
beside the pipeline file (procd's own interpreter). Measured from outside, wall clock:
- first build: ``procd build`` with no environment yet (isolated build environment, backend,
  install);
- cached build: ``procd build`` again (hash of the sources, the environment found complete);
- cached run vs plain run: a whole ``procd run`` of the small finite pipeline, median of
  ``--repeat`` runs of each, alternated; the difference is what a cached environment adds
  (issue 11 allows 50 ms). On a loaded machine wall time swings by more than that, so the CPU
  time of each run and all its processes (``RUSAGE_CHILDREN``) is printed too.
pip installs from ``--wheelhouse`` only (``.ci/run`` fills it), so no figure includes the network.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PROCD = [sys.executable, "-m", "procd"]

STAGES = """\
def numbers(count=1000):
    yield from range(count)

def double(n):
    return n * 2

class Total:
    def __init__(self):
        self.total = 0
    def __call__(self, n):
        self.total += n
    def close(self):
        print(self.total)
"""


def pipeline(name: str, method: str, packages: bool) -> str:
    return textwrap.dedent(
        f"""\
        [pipeline]
        name = "{name}"
        start_method = "{method}"
        state_dir = "state-{name}"
        {'packages = ["project"]' if packages else ""}

        [stages.numbers]
        function = "benchstages:numbers"

        [stages.double]
        function = "benchstages:double"
        inputs = ["numbers"]
        processes = 2

        [stages.total]
        function = "benchstages:Total"
        inputs = ["double"]
        """
    )


CPU: list[float] = []  # CPU seconds (user + system) of the last command and everything it started


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Wall-clock seconds of a whole command, and what it printed; its CPU time goes to ``CPU``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed, done.stdout


def inner_seconds(output: str) -> float:
    """The time procd build reports for finding or building the environment (its last line)."""
    return float(re.search(r" in (\d+\.\d+)s;", output.splitlines()[-1]).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--method", choices=("forkserver", "spawn"), default="forkserver")
    parser.add_argument("--wheelhouse", default=str(Path(__file__).resolve().parent.parent / ".wheelhouse"))
    args = parser.parse_args()
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": os.path.abspath(args.wheelhouse)}

    with tempfile.TemporaryDirectory(prefix="procd-bench-build-") as tmp:
        root = Path(tmp)
        (root / "project" / "benchstages").mkdir(parents=True)
        (root / "project" / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n'
            '[project]\nname = "benchstages"\nversion = "1.0"\n'
        )
        (root / "project" / "benchstages" / "__init__.py").write_text(STAGES)
        (root / "loose").mkdir()
        (root / "loose" / "benchstages.py").write_text(STAGES)
        (root / "packaged.toml").write_text(pipeline("bench-packaged", args.method, packages=True))
        (root / "loose" / "plain.toml").write_text(pipeline("bench-plain", args.method, packages=False))

        first, output = timed([*PROCD, "build", "packaged.toml"], root, env)
        first_inner = inner_seconds(output)
        cached_runs = [timed([*PROCD, "build", "packaged.toml"], root, env) for _ in range(args.repeat)]
        cached = [seconds for seconds, _ in cached_runs]
        cached_inner = [inner_seconds(output) for _, output in cached_runs]
        packaged, plain, packaged_cpu, plain_cpu = [], [], [], []
        for _ in range(args.repeat):  # alternated, so a change in the machine's load hits both
            packaged.append(timed([*PROCD, "run", "packaged.toml", "--control", str(root / "p.sock")], root, env)[0])
            packaged_cpu.append(CPU[-1])
            plain.append(
                timed([*PROCD, "run", "plain.toml", "--control", str(root / "q.sock")], root / "loose", env)[0]
            )
            plain_cpu.append(CPU[-1])

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f})"

    print(f"start_method = {args.method}, {args.repeat} runs each")
    print(f"first build (procd build, no environment yet): {first:.2f} s (the build itself {first_inner:.2f} s)")
    print(f"cached build (procd build, environment reused): {ms(cached)}")
    print(f"  of which finding the environment (hash, lock): median {statistics.median(cached_inner):.2f} s")
    print(f"procd run, stage code in a built project:      {ms(packaged)}")
    print(f"procd run, the same code beside the file:      {ms(plain)}")
    extra = (statistics.median(packaged) - statistics.median(plain)) * 1000
    print(f"a cached environment adds {extra:.0f} ms to a run (median; issue 11 allows 50 ms)")
    extra_cpu = (statistics.median(packaged_cpu) - statistics.median(plain_cpu)) * 1000
    print(
        f"CPU time of a whole run, every process: {statistics.median(packaged_cpu) * 1000:.0f} ms with the "
        f"project, {statistics.median(plain_cpu) * 1000:.0f} ms without ({extra_cpu:+.0f} ms; medians)"
    )


if __name__ == "__main__":
    main()
