"""Running a procd pipeline, or any command, from a benchmark, and leaving nothing behind.

``Pipeline`` writes a pipeline file and its stage module into a temporary directory, starts
``procd run`` as a real subprocess (loopback only: a control socket in that directory), reads its
log file, and on leaving stops it and makes sure every process it started is gone.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from procfs import alive, descendants, wait_for


def procd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "procd", *args]


def timestamp(record: dict[str, Any]) -> float:
    """A log record's ``ts`` as seconds since the epoch."""
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def reap_tree(pids: set[int], timeout: float = 10.0) -> None:
    """Wait for ``pids`` to be gone; SIGKILL whatever is left after ``timeout``."""
    try:
        wait_for(lambda: not any(alive(p) for p in pids), timeout, interval=0.005)
    except TimeoutError:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Tree:
    """A started command and every process ever seen below it (to check at the end that all
    are gone)."""

    proc: subprocess.Popen[Any] | None = None

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def remember(self) -> set[int]:
        """Every process below the command now (and remembered)."""
        if self.proc is None:
            return set()
        now = descendants(self.proc.pid)
        self._seen |= now
        return now


class Pipeline(Tree):
    """One ``procd run`` of a generated pipeline, as a context manager.

    ``toml`` may use ``{python}`` (this interpreter) and ``{dir}`` (the pipeline's directory).
    """

    def __init__(self, toml: str, stages: str = "", *, name: str = "bench", env: dict[str, str] | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="procd-bench-"))
        self.name = f"{name}-{os.getpid()}"  # its processes' titles say which run they belong to
        self.file = self.dir / f"{self.name}.toml"
        self.log = self.dir / "log.jsonl"
        self.control = self.dir / "control.sock"
        body = textwrap.dedent(toml).replace("{python}", sys.executable).replace("{dir}", str(self.dir))
        self.file.write_text(f'[pipeline]\nname = "{self.name}"\nstop_timeout = "5s"\n' + body)
        (self.dir / "benchstages.py").write_text(textwrap.dedent(stages))
        self.env = env
        super().__init__()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # perf_counter at launch
        self.started_wall = 0.0  # time.time at launch

    def write(self, relative: str, text: str) -> Path:
        target = self.dir / relative
        target.write_text(textwrap.dedent(text))
        return target

    def __enter__(self) -> Pipeline:
        return self

    def start(self) -> Pipeline:
        self.started_wall = time.time()
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            procd_command("run", str(self.file), "--log-file", str(self.log), "--control", str(self.control)),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """The complete records written so far (the last line may still be half written)."""
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]

    def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the first record named ``name``."""

        def find() -> dict[str, Any] | None:
            return next((r for r in self.records() if r.get("event") == name), None)

        return self.until(find, timeout, f"no {name} record")

    def output(self, prefix: str, timeout: float = 30.0, count: int = 1) -> list[str]:
        """Wait for ``count`` worker output lines that start with ``prefix``."""

        def find() -> list[str] | None:
            lines = [
                r["line"] for r in self.records() if r.get("event") == "worker_output" and r["line"].startswith(prefix)
            ]
            return lines if len(lines) >= count else None

        return self.until(find, timeout, f"fewer than {count} output lines starting with {prefix!r}")

    def until(self, find: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``find`` (every 2 ms) while procd runs; fail with the log's tail otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            self.remember()
            value = find()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None and not find():
                raise RuntimeError(f"procd exited ({self.proc.returncode}) with {what}; log tail: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:g} s; log tail: {self.tail()}")
            time.sleep(0.002)

    def tail(self) -> str:
        try:
            return self.log.read_text()[-1500:]
        except FileNotFoundError:
            return "(no log)"

    def wait(self, timeout: float = 120.0) -> int:
        """Wait for procd to finish by itself; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL past ``timeout``; then every process it had is gone."""
        if self.proc is None:
            return
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        reap_tree(self._seen)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def run_command(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    """Run a command to its end (it must exit 0); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120, check=True)
    return time.perf_counter() - start


class Script(Tree):
    """A classic-pattern Python script in a temporary directory, started as its own command."""

    def __init__(self, source: str, name: str = "classic.py") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="procd-bench-"))
        self.path = self.dir / name
        self.path.write_text(textwrap.dedent(source))
        super().__init__()
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Script:
        return self

    def run(self, *args: str, timeout: float = 300.0) -> tuple[float, str]:
        """Run it to its end; (wall seconds, stdout). It must exit 0."""
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(self.path), *args], cwd=self.dir, capture_output=True, text=True, timeout=timeout
        )
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{self.path.name} exited {proc.returncode}: {proc.stderr[-1500:]}")
        return elapsed, proc.stdout

    def start(self, *args: str) -> subprocess.Popen[str]:
        self.proc = subprocess.Popen(
            [sys.executable, str(self.path), *args],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        return self.proc

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if self.proc is not None:
                # A classic script's children do not die with it: kill the whole tree at once.
                for pid in {self.proc.pid} | self.remember():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait()
                if self.proc.stdout is not None:
                    self.proc.stdout.close()
                reap_tree(self._seen)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
