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
  (issue 11 allows 50 ms).
pip installs from ``--wheelhouse`` only (``.ci/run`` fills it), so no figure includes the network.
"""

from __future__ import annotations

import argparse
import os
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


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


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

        first = timed([*PROCD, "build", "packaged.toml"], root, env)
        cached = [timed([*PROCD, "build", "packaged.toml"], root, env) for _ in range(args.repeat)]
        packaged, plain = [], []
        for _ in range(args.repeat):  # alternated, so a change in the machine's load hits both
            packaged.append(timed([*PROCD, "run", "packaged.toml", "--control", str(root / "p.sock")], root, env))
            plain.append(timed([*PROCD, "run", "plain.toml", "--control", str(root / "q.sock")], root / "loose", env))

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f})"

    print(f"start_method = {args.method}, {args.repeat} runs each")
    print(f"first build (procd build, no environment yet): {first:.2f} s")
    print(f"cached build (procd build, environment reused): {ms(cached)}")
    print(f"procd run, stage code in a built project:      {ms(packaged)}")
    print(f"procd run, the same code beside the file:      {ms(plain)}")
    extra = (statistics.median(packaged) - statistics.median(plain)) * 1000
    print(f"a cached environment adds {extra:.0f} ms to a run (median; issue 11 allows 50 ms)")


if __name__ == "__main__":
    main()
