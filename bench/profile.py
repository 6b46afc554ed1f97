"""Where the time goes: py-spy samples of every process of the 3-stage pipeline (the producer
path, the consumer path, the supervisor), and ``python -X importtime`` of procd's start-up.

    .venv/bin/pip install py-spy      # once, into the venv (not a dependency of procd)
    .venv/bin/python bench/profile.py [--items 1000000] [--rate 500]

py-spy samples (without --idle: a process waiting in ``select`` is mostly not counted) every
process of one ``procd run`` of bench/cpu.py's 3-stage pipeline (bench/throughput.py's stages).
Per process kind, the lines that were on top of the Python stack most often, each as a share of
that kind's samples and as CPU microseconds per item of the whole run (samples / rate / items).
Then what ``procd run`` of a trivial pipeline spends its start-up on (py-spy, 5 runs), and the
imports that cost most in ``procd --version`` and ``procd run`` of a trivial pipeline
(``PYTHONDONTWRITEBYTECODE=1``, as these machines set it: procd's own modules are compiled every
time, and with bytecode).
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cpu
from harness import Pipeline, procd_command
from procfs import load_text

PACKAGE = Path(__file__).resolve().parent.parent / "daemon"
FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^:()]+):(?P<line>\d+)\)$")
ROLE = re.compile(r'process \d+:"procd: [^/]+/(?P<stage>[a-z]+)\[\d+\]"')


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def source(file: str, line: int, workdir: Path) -> str:
    for base in (PACKAGE, workdir):
        path = base / file
        if path.exists():
            return linecache.getline(str(path), line).strip()
    return ""


def category(file: str, text: str) -> str:
    """A line's kind of work, from its file and its source text."""
    if file == "benchstages.py":
        return "stage code (the user's)"
    if "pickle." in text:
        return "pickle"
    if "select" in text:
        return "select (waiting, not all counted)"
    if any(call in text for call in ("eventfd", "recvmsg", ".send(", "os.write", "os.read", "os.fork")):
        return "system calls (eventfd, socket, pipe, fork)"
    if file.startswith("procd/"):
        return "procd's per-item Python (loops, calls, batching)"
    return "other (imports, start-up, stdlib)"


def sample_pipeline(items: int, rate: int) -> None:
    with Pipeline(cpu.THREE_STAGES.format(count=items), cpu.STAGES, name="bench-profile") as pipeline:
        raw = pipeline.dir / "raw.txt"
        argv = [py_spy(), "record", "--rate", str(rate), "--subprocesses", "--format", "raw", "--output", str(raw)]
        argv += ["--", *procd_command("run", str(pipeline.file), "--control", str(pipeline.control))]
        subprocess.run(argv, cwd=pipeline.dir, capture_output=True, timeout=600, check=True)
        by_role: dict[str, collections.Counter[tuple[str, int, str]]] = collections.defaultdict(collections.Counter)
        for text in raw.read_text().splitlines():
            stack, _, count = text.rpartition(" ")
            frames = stack.split(";")
            role = next((m["stage"] for f in frames if (m := ROLE.match(f))), "supervisor")
            leaf = FRAME.match(frames[-1])
            key = (leaf["file"], int(leaf["line"]), leaf["func"]) if leaf else (frames[-1], 0, "")
            by_role[role][key] += int(count)
        print(f"py-spy, {rate} Hz, {items:,} items, 1 producer -> 2 transforms -> 1 sink; {load_text()}")
        for role in ("produce", "transform", "sink", "supervisor"):
            counter = by_role.get(role)
            if not counter:
                continue
            total = sum(counter.values())
            print(f"\n{role}: {total} samples = {total / rate:.2f} s CPU = {total / rate / items * 1e6:.2f} us/item")
            kinds: collections.Counter[str] = collections.Counter()
            for (file, line, _func), count in counter.items():
                kinds[category(file, source(file, line, pipeline.dir))] += count
            for kind, count in kinds.most_common():
                print(f"  {count / total * 100:5.1f}%  {count / rate / items * 1e6:5.2f} us/item  {kind}")
            print("  the lines:")
            for (file, line, func), count in counter.most_common(12):
                where = f"{file}:{line} {func}"
                print(
                    f"  {count / total * 100:5.1f}%  {count / rate / items * 1e6:5.2f} us/item  {where:45} "
                    f"{source(file, line, pipeline.dir)[:70]}"
                )


def startup_phases(runs: int, rate: int, top: int) -> None:
    """py-spy of ``procd run`` of a trivial pipeline, ``runs`` times: the functions and module
    bodies most often on the supervisor's stack (inclusive), as a share of its samples."""
    trivial = (
        '[stages.one]\nfunction = "benchstages:one"\n[stages.sink]\nfunction = "benchstages:drop"\ninputs = ["one"]\n'
    )
    code = "def one():\n    yield 1\n\ndef drop(item):\n    pass\n"
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with Pipeline(trivial, code, name="bench-startup-profile") as pipeline:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        for number in range(runs):
            raw = pipeline.dir / f"raw{number}.txt"
            argv = [py_spy(), "record", "--rate", str(rate), "--format", "raw", "--output", str(raw), "--"]
            argv += procd_command("run", str(pipeline.file), "--control", str(pipeline.control))
            subprocess.run(argv, cwd=pipeline.dir, env=env, capture_output=True, timeout=120, check=True)
            for text in raw.read_text().splitlines():
                stack, _, count = text.rpartition(" ")
                total += int(count)
                names = {f"{m['func']} ({m['file']})" for f in stack.split(";") if (m := FRAME.match(f))}
                for name in names:
                    if "importlib" not in name and "runpy" not in name:
                        inclusive[name] += int(count)
    print(f"\nprocd run of a trivial pipeline, py-spy {rate} Hz, {runs} runs, {total} samples; {load_text()}")
    print("  (inclusive: a module body counts the imports it makes; sampling slows the run, shares hold)")
    for name, count in inclusive.most_common(top):
        print(f"  {count / total * 100:5.1f}%  {name}")


def imports(argv: list[str], cwd: str | None, pycache: str | None = None) -> list[tuple[int, int, str]]:
    """(cumulative us, self us, indented name) of every import of ``procd ARGV``; without
    bytecode (``PYTHONDONTWRITEBYTECODE=1``), or with it written to and read from ``pycache``."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if pycache:
        env.pop("PYTHONDONTWRITEBYTECODE")
        env["PYTHONPYCACHEPREFIX"] = pycache
    command = [sys.executable, "-X", "importtime", "-m", "procd", *argv]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self" not in line:
            own, cumulative, name = line.removeprefix("import time:").split("|")
            rows.append((int(cumulative), int(own), name.rstrip()))
    return rows


def import_times(argv: list[str], cwd: str | None, top: int) -> None:
    rows = imports(argv, cwd)
    with tempfile.TemporaryDirectory() as pycache:
        imports(argv, cwd, pycache)  # writes the bytecode
        cached = imports(argv, cwd, pycache)

    def own(of: list[tuple[int, int, str]], *prefixes: str) -> float:
        return sum(o for _c, o, n in of if n.strip().split(".")[0] in prefixes) / 1000

    def whole(of: list[tuple[int, int, str]]) -> float:
        return sum(c for c, _o, n in of if not n.startswith("  ")) / 1000  # one space: a top-level import

    print(
        f"\n-X importtime -m procd {argv[0]}: {len(rows)} modules; all imports {whole(rows):.1f} ms without bytecode "
        f"({whole(cached):.1f} ms with); self time of procd's own modules {own(rows, 'procd'):.1f} ms "
        f"({own(cached, 'procd'):.1f} ms with), of structlog's {own(rows, 'structlog'):.1f}, asyncio's "
        f"{own(rows, 'asyncio'):.1f}, ssl's {own(rows, 'ssl', '_ssl'):.1f} ms"
    )
    print("  cumulative ms   self ms  module (indent = imported by the line above it)")
    for cumulative, own, name in sorted(rows, reverse=True)[:top]:
        print(f"  {cumulative / 1000:13.1f} {own / 1000:9.1f}  {name}")
    print("  most self time:")
    for _cumulative, own, name in sorted(rows, key=lambda r: -r[1])[: top // 2]:
        print(f"  {own / 1000:23.1f}  {name.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=20, help="imports shown")
    args = parser.parse_args()
    sample_pipeline(args.items, args.rate)
    startup_phases(5, args.rate, args.top + 10)
    import_times(["--version"], None, args.top)
    trivial = '[stages.one]\nfunction = "benchstages:one"\n'
    with Pipeline(trivial, "def one():\n    yield 1\n", name="bench-importtime") as pipeline:
        import_times(["run", str(pipeline.file), "--control", str(pipeline.control)], str(pipeline.dir), args.top)


if __name__ == "__main__":
    main()
