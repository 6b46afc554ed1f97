"""Start-up and memory: the whole ``procd`` command against ``python -c pass`` and a 1-process
classic script, and an idle pipeline's memory against the classic pattern's.

    .venv/bin/python bench/startup.py [--quick] [--repeat 10] [--no-installed]

Wall time of each command, median of ``--repeat`` rounds, every command run once per round
(round-robin, after a warm-up round, so that the machine's load falls on all alike):
- ``procd run`` of a trivial pipeline (a producer yielding one item → a sink), and how much of
  it passes before the ``pipeline_starting`` record;
- ``procd --version``, ``procd status`` (against a running pipeline), ``procd check FILE``;
- anchors: ``python -c pass`` and a 1-process classic script (one ``multiprocessing.Process``
  reading one item from a ``multiprocessing.Queue``).
procd is run three ways: this venv's editable install with ``PYTHONDONTWRITEBYTECODE=1`` (what
these machines set: procd's modules are compiled again on every start), the same with bytecode
written (to a temporary ``PYTHONPYCACHEPREFIX``, never into the source tree), and installed
(``pip install .``, not editable, into a temporary venv that is removed afterwards; setting it up
is the only step that may reach beyond loopback, to the package index pip is configured with;
``--no-installed`` skips it). Memory: an idle 3-stage pipeline (1 producer → 2 transforms → 1
sink) against the same classic pattern: the total PSS (/proc/PID/smaps_rollup) of every process
of each, and each worker's RSS; procd's as the editable install without bytecode, and with it.
Targets (issue 12): ``run`` <= 60 ms; ``--version``, ``status``, ``check`` <= 4x ``python -c
pass``; PSS <= 1.2x classic.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import Pipeline, Script, run_command, timestamp
from procfs import descendants, load_text, pss_kib, rss_kib, wait_for
from report import Row, header, table

REPO = Path(__file__).resolve().parent.parent

TRIVIAL = """
[stages.produce]
function = "benchstages:one"
[stages.sink]
function = "benchstages:drop"
inputs = ["produce"]
"""

IDLE = """
[stages.produce]
function = "benchstages:idle"
[stages.transform]
function = "benchstages:transform"
inputs = ["produce"]
processes = 2
[stages.sink]
function = "benchstages:drop"
inputs = ["transform"]
"""

STAGES = """
    import time

    def one():
        yield {"id": 1}

    def idle():
        while True:
            time.sleep(3600)
            yield None

    def transform(item):
        return item

    def drop(item):
        pass
"""

CLASSIC_ONE = """
    import multiprocessing as mp

    def work(q):
        q.get()

    if __name__ == "__main__":
        q = mp.Queue()
        p = mp.Process(target=work, args=(q,))
        p.start()
        q.put({"id": 1})
        p.join()
"""

CLASSIC_IDLE = """
    import multiprocessing as mp
    import sys
    import time

    def produce(out):
        while True:
            time.sleep(3600)

    def transform(inq, out):
        while (item := inq.get()) is not None:
            out.put(item)

    def sink(inq):
        while inq.get() is not None:
            pass

    if __name__ == "__main__":
        q1, q2 = mp.Queue(10000), mp.Queue(10000)
        procs = [mp.Process(target=produce, args=(q1,))]
        procs += [mp.Process(target=transform, args=(q1, q2)) for _ in range(2)]
        procs += [mp.Process(target=sink, args=(q2,))]
        for p in procs:
            p.start()
        print("ready", flush=True)
        for p in procs:
            p.join()
"""


def environment(pycache: str | None = None) -> dict[str, str]:
    """This environment with ``PYTHONDONTWRITEBYTECODE=1``; or, given ``pycache``, with bytecode
    written there (``PYTHONPYCACHEPREFIX``), never into the source tree, whose missing
    ``__pycache__`` is what the first case measures."""
    env = dict(os.environ)
    if pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def interleaved(commands: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Median seconds of each command over ``repeat`` rounds, run round-robin after one warm-up
    round, so that a change in the machine's load falls on every command alike."""
    times: dict[str, list[float]] = {key: [] for key in commands}
    for round_number in range(repeat + 1):
        for key, run in commands.items():
            seconds = run()
            if round_number:
                times[key].append(seconds)
    return {key: statistics.median(values) for key, values in times.items()}


def trivial_run(procd: str, pipeline: Pipeline, env: dict[str, str], shares: list[float]) -> Callable[[], float]:
    """A run of ``procd run`` of the trivial pipeline: its wall seconds; it appends to ``shares``
    how much of that passed before the ``pipeline_starting`` record."""

    def run() -> float:
        if pipeline.log.exists():
            pipeline.log.unlink()
        launched = time.time()
        total = run_command(
            [procd, "run", str(pipeline.file), "--log-file", str(pipeline.log), "--control", str(pipeline.control)],
            env=env,
            cwd=str(pipeline.dir),
        )
        starting = next(r for r in pipeline.records() if r["event"] == "pipeline_starting")
        shares.append((timestamp(starting) - launched) / total)
        return total

    return run


def installed_procd(workdir: str) -> str:
    """``pip install .`` into a new venv under ``workdir``; the path of its ``procd``. From a copy of
    the tree: built in place, setuptools would leave ``build/`` and ``*.egg-info`` in it (and a
    later build would take stale modules from ``build/lib``)."""
    venv = os.path.join(workdir, "venv")
    source = os.path.join(workdir, "source")
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"),
    )
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, timeout=300)
    pip = subprocess.run(
        [os.path.join(venv, "bin", "pip"), "install", "-q", source], capture_output=True, text=True, timeout=600
    )
    if pip.returncode != 0:
        raise RuntimeError(f"pip install . failed: {pip.stdout[-1000:]}{pip.stderr[-2000:]}")
    return os.path.join(venv, "bin", "procd")


def total_pss_mib(root: int) -> tuple[float, list[float]]:
    """(total PSS of ``root`` and every process below it, RSS of each process below it), MiB."""
    below = sorted(descendants(root))
    total = sum(pss_kib(p) for p in [root, *below]) / 1024
    return total, [rss_kib(p) / 1024 for p in below]


def idle_pss(settle_s: float, env: dict[str, str]) -> tuple[float, list[float]]:
    """The idle 3-stage pipeline's ``total_pss_mib``, once it has settled."""
    with Pipeline(IDLE, STAGES, name="bench-idle", env=env) as pipeline:
        pipeline.start()
        pipeline.event("pipeline_ready")
        wait_for(lambda: len(pipeline.remember()) >= 4, timeout=30, interval=0.01)
        time.sleep(settle_s)
        return total_pss_mib(pipeline.pid)


def memory(settle_s: float, workdir: str) -> tuple[tuple[float, list[float]], float, tuple[float, list[float]]]:
    """procd's idle pipeline as these machines run it (``PYTHONDONTWRITEBYTECODE=1``: the
    supervisor compiles procd's modules, and the compiler's garbage stays in its heap), its total
    PSS with bytecode, and the classic pattern's."""
    mine = idle_pss(settle_s, environment())
    with_bytecode = idle_pss(settle_s, environment(os.path.join(workdir, "pycache")))[0]
    with Script(CLASSIC_IDLE) as script:
        proc = script.start()
        assert proc.stdout is not None
        proc.stdout.readline()
        wait_for(lambda: len(script.remember()) >= 4, timeout=30, interval=0.01)
        time.sleep(settle_s)
        theirs = total_pss_mib(proc.pid)
    return mine, with_bytecode, theirs


def measure(quick: bool = False, repeat: int | None = None, installed: bool = True) -> list[Row]:
    repeat = repeat or (1 if quick else 10)
    quiet = environment()
    workdir = tempfile.mkdtemp(prefix="procd-bench-venv-")
    editable = str(Path(sys.executable).parent / "procd")
    variants = {"editable": (editable, quiet), "bytecode": (editable, environment(os.path.join(workdir, "pycache")))}
    shares: dict[str, list[float]] = {}
    try:
        if installed:
            variants["installed"] = (installed_procd(workdir), quiet)
        with (
            Script(CLASSIC_ONE) as classic,
            Pipeline(TRIVIAL, STAGES, name="bench-trivial") as trivial,
            Pipeline(IDLE, STAGES, name="bench-status") as running,
        ):
            running.start()
            running.event("pipeline_ready")
            commands: dict[str, Callable[[], float]] = {
                "pass": functools.partial(run_command, [sys.executable, "-c", "pass"], env=quiet),
                "classic": functools.partial(run_command, [sys.executable, str(classic.path)], env=quiet),
            }
            for key, (procd, env) in variants.items():
                shares[key] = []
                status = [procd, "status", running.name, "--control", str(running.control)]
                check = [procd, "check", str(trivial.file)]
                commands[f"{key}:run"] = trivial_run(procd, trivial, env, shares[key])
                commands[f"{key}:version"] = functools.partial(run_command, [procd, "--version"], env=env)
                commands[f"{key}:status"] = functools.partial(run_command, status, env=env)
                commands[f"{key}:check"] = functools.partial(run_command, check, env=env)
            times = interleaved(commands, repeat)
        # after the runs above, which wrote the bytecode that the second measure reads
        (pss, rss), bytecode_pss, (classic_pss, classic_rss) = memory(0.2 if quick else 1.0, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bare, classic_one = times["pass"], times["classic"]
    figures = {key: {c: times[f"{key}:{c}"] for c in ("run", "version", "status", "check")} for key in variants}
    figures["editable"]["share"] = statistics.median(shares["editable"])

    def others(command: str, scale: Callable[[float], str]) -> str:
        return ", ".join(f"{k} {scale(figures[k][command])}" for k in figures if k != "editable")

    run_ms = figures["editable"]["run"] * 1000
    # Bytecode left in the source tree (by a run without PYTHONDONTWRITEBYTECODE) is read even
    # when none is written: then the first case does not measure what it says.
    stale = " [daemon/procd/__pycache__ exists: read]" if (REPO / "daemon" / "procd" / "__pycache__").exists() else ""
    rows = [
        Row(
            "startup_run",
            f"procd run of a trivial pipeline, whole command (editable, PYTHONDONTWRITEBYTECODE=1){stale}",
            f"{run_ms:.1f} ms ({others('run', lambda s: f'{s * 1000:.1f}')}); "
            f"{figures['editable']['share'] * 100:.0f}% before pipeline_starting",
            f"python -c pass {bare * 1000:.1f} ms; classic 1-process script {classic_one * 1000:.1f} ms",
            f"{figures['editable']['run'] / bare:.1f}x pass, {figures['editable']['run'] / classic_one:.1f}x classic",
            "<= 60 ms",
            run_ms,
            run_ms <= 60,
        )
    ]
    for command, label in (("version", "procd --version"), ("status", "procd status"), ("check", "procd check FILE")):
        seconds = figures["editable"][command]
        rows.append(
            Row(
                f"startup_{command}",
                f"{label} (editable, PYTHONDONTWRITEBYTECODE=1){stale}",
                f"{seconds * 1000:.1f} ms ({others(command, lambda s: f'{s / bare:.1f}x')})",
                f"python -c pass {bare * 1000:.1f} ms",
                f"{seconds / bare:.1f}x pass",
                "<= 4x",
                seconds / bare,
                seconds / bare <= 4,
            )
        )
    rows.append(
        Row(
            "idle_memory",
            "idle 3-stage pipeline, total PSS (each worker's RSS) (editable, PYTHONDONTWRITEBYTECODE=1)",
            f"{pss:.1f} MiB ({min(rss):.1f}-{max(rss):.1f} MiB); bytecode {bytecode_pss:.1f} MiB",
            f"classic {classic_pss:.1f} MiB ({min(classic_rss):.1f}-{max(classic_rss):.1f} MiB)",
            f"{pss / classic_pss:.2f}x",
            "<= 1.2x classic",
            pss / classic_pss,
            pss / classic_pss <= 1.2,
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run of each: checks that it runs")
    parser.add_argument("--repeat", type=int, help="runs of each command, median reported (default 10)")
    parser.add_argument("--no-installed", action="store_true", help="skip the pip-installed procd (it takes ~10 s)")
    args = parser.parse_args()
    print(header(), flush=True)  # the load before the runs (report.print_rows prints it after them)
    print(table(measure(args.quick, args.repeat, not args.no_installed)))
    print(f"at end: {load_text()}")


if __name__ == "__main__":
    sys.exit(main())
