"""Start-up of two versions of procd side by side: ``--version``, ``status``, ``check`` and ``run``
of a trivial pipeline, each command of each version run in turn, round after round, so that the
machine's load falls on both alike; and ``python -c pass`` as the anchor.

    .venv/bin/python bench/startup_ab.py [--before main] [--after HEAD] [--repeat 15] [--bytecode]
                                         [--memory 3]

Each version is a ``git archive`` of its ref's ``daemon/`` in a temporary directory, put first on
``PYTHONPATH`` (ahead of the editable install), run by this venv's interpreter. Without
``--bytecode``, ``PYTHONDONTWRITEBYTECODE=1`` as on these machines (procd's modules are compiled on
every start); with it, bytecode is written to a temporary ``PYTHONPYCACHEPREFIX`` after a warm-up
round. Prints the median and the minimum of each, in ms, and the load. With ``--memory N``, also
the total PSS of an idle 3-stage pipeline (1 producer → 2 transforms → 1 sink; the supervisor and
its 4 workers, ``/proc/PID/smaps_rollup``, 1 s after the fourth worker exists) of each version, N
rounds, alternating, median and minimum in MiB.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procfs import descendants, pss_kib, wait_for

REPO = Path(__file__).resolve().parent.parent
STAGES = 'def one():\n    yield {"id": 1}\n\n\ndef drop(item):\n    pass\n'
PIPELINE = (
    '[stages.produce]\nfunction = "abstages:one"\n[stages.sink]\nfunction = "abstages:drop"\ninputs = ["produce"]\n'
)
IDLE_STAGES = "import time\n\n\ndef idle():\n    while True:\n        time.sleep(3600)\n        yield None\n"
IDLE = (
    '[stages.produce]\nfunction = "abidle:idle"\n'
    '[stages.transform]\nfunction = "abstages:drop"\ninputs = ["produce"]\nprocesses = 2\n'
    '[stages.sink]\nfunction = "abstages:drop"\ninputs = ["transform"]\n'
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


def _idle_pss_mib(env: dict[str, str], cwd: Path) -> float:
    """Total PSS of the idle pipeline run with ``env``: the supervisor and its 4 workers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "procd", "run", "idle.toml", "--control", str(cwd / "idle.sock")],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(descendants(proc.pid)) >= 4, timeout=30, interval=0.01)
        time.sleep(1.0)
        return sum(pss_kib(pid) for pid in [proc.pid, *descendants(proc.pid)]) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--bytecode", action="store_true", help="write and use bytecode (a temporary prefix)")
    parser.add_argument("--memory", type=int, default=0, metavar="N", help="also N rounds of the idle pipeline's PSS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="procd-startup-ab-") as tmp:
        work = Path(tmp)
        (work / "abstages.py").write_text(STAGES)
        (work / "ab.toml").write_text(PIPELINE)
        (work / "abidle.py").write_text(IDLE_STAGES)
        (work / "idle.toml").write_text(IDLE)
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
        versions: dict[str, dict[str, str]] = {}
        for label, ref in (("before", args.before), ("after", args.after)):
            daemon = _export(ref, work / label)
            env = {**base, "PYTHONPATH": os.pathsep.join([str(daemon), str(work)])}
            versions[f"{label}: {ref}"] = env
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
        pss: dict[str, list[float]] = {name: [] for name in versions}
        for _round in range(args.memory):
            for name, env in versions.items():
                pss[name].append(_idle_pss_mib(env, work))
        for name, values in pss.items():
            if values:
                label, middle = f"idle PSS ({name})", statistics.median(values)
                print(f"{label:<40} median {middle:7.1f} MiB  min {min(values):7.1f} MiB  ({len(values)} rounds)")
        print(f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
