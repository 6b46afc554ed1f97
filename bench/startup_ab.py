"""Start-up of two versions of procd side by side: ``--version``, ``status``, ``check`` and ``run``
of a trivial pipeline, each command of each version run in turn, round after round, so that the
machine's load falls on both alike; and ``python -c pass`` as the anchor.

    .venv/bin/python bench/startup_ab.py [--before main] [--after HEAD] [--repeat 15] [--bytecode]

Each version is a ``git archive`` of its ref's ``daemon/`` in a temporary directory, put first on
``PYTHONPATH`` (ahead of the editable install), run by this venv's interpreter. Without
``--bytecode``, ``PYTHONDONTWRITEBYTECODE=1`` as on these machines (procd's modules are compiled on
every start); with it, bytecode is written to a temporary ``PYTHONPYCACHEPREFIX`` after a warm-up
round. Prints the median and the minimum of each, in ms, and the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = 'def one():\n    yield {"id": 1}\n\n\ndef drop(item):\n    pass\n'
PIPELINE = (
    '[stages.produce]\nfunction = "abstages:one"\n[stages.sink]\nfunction = "abstages:drop"\ninputs = ["produce"]\n'
)


def _export(ref: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "daemon"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "daemon"


def _time(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--bytecode", action="store_true", help="write and use bytecode (a temporary prefix)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="procd-startup-ab-") as tmp:
        work = Path(tmp)
        (work / "abstages.py").write_text(STAGES)
        (work / "ab.toml").write_text(PIPELINE)
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        if args.bytecode:
            base["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        else:
            base["PYTHONDONTWRITEBYTECODE"] = "1"
        commands = {
            "--version": ["--version"],
            "status": ["status", "--control", str(work / "none.sock")],
            "check FILE": ["check", "ab.toml"],
            "run (trivial)": ["run", "ab.toml", "--control", str(work / "run.sock")],
        }
        cases: list[tuple[str, list[str], dict[str, str]]] = [("python -c pass", [sys.executable, "-c", "pass"], base)]
        for label, ref in (("before", args.before), ("after", args.after)):
            daemon = _export(ref, work / label)
            env = {**base, "PYTHONPATH": os.pathsep.join([str(daemon), str(work)])}
            cases += [
                (f"{name} ({label}: {ref})", [sys.executable, "-m", "procd", *argv], env)
                for name, argv in commands.items()
            ]
        print(
            f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}; bytecode: {'yes' if args.bytecode else 'no'}"
        )
        times: dict[str, list[float]] = {name: [] for name, _argv, _env in cases}
        for round_number in range(args.repeat + 1):
            for name, argv, env in sorted(cases, key=lambda case: case[0].split(" (")[0]):
                elapsed = _time(argv, env, work)
                if round_number:  # the first round only warms up (and writes the bytecode)
                    times[name].append(elapsed)
        for name, _argv, _env in cases:
            print(f"{name:<40} median {statistics.median(times[name]):7.1f} ms  min {min(times[name]):7.1f} ms")
        print(f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
