"""Shared helpers: run ``procd`` as a real subprocess, read its JSON records, leave nothing behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"
# What the tests build stage projects with (.ci/run downloads it; git-ignored): a build backend,
# and a small pure-Python distribution that procd itself does not have.
WHEELHOUSE = REPO / ".wheelhouse"
WHEELS = ("setuptools", "wheel", "six")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (from /proc), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def processes_titled(prefix: str) -> dict[int, str]:
    """pid -> title of every live (non-zombie) process whose /proc cmdline starts with ``prefix``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                title = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if title.startswith(prefix) and state != "Z":
            found[int(entry)] = title
    return found


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    records: list[dict[str, Any]]

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == name and all(r.get(k) == v for k, v in match.items())]

    def output_lines(self, stage: str | None = None) -> list[str]:
        return [r["line"] for r in self.events("worker_output") if stage is None or r["stage"] == stage]


def parse_records(text: str) -> list[dict[str, Any]]:
    """Every line must be one JSON object: the log format is a contract."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a log file that procd may still be writing (a reader can see the
    first part of a line whose write has not finished)."""
    if not path.exists():
        return []
    text = path.read_text()
    return parse_records(text[: text.rfind("\n") + 1])


def procd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "procd", *args]


class Workspace:
    """A temporary directory holding pipeline files and their stage modules."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._started = 0

    def write(self, relative: str, text: str) -> Path:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
        return target

    def pipeline(self, text: str, *, stem: str | None = None) -> Path:
        """Write a pipeline file; ``{name}`` in the text becomes this test's unique pipeline name."""
        return self.write(f"{stem or self.name}.toml", textwrap.dedent(text).replace("{name}", self.name))

    @property
    def control(self) -> Path:
        return self.path / "control.sock"

    def _with_control(self, args: tuple[str, ...]) -> tuple[str, ...]:
        """Tests keep their control sockets in their own directory, not under /run/procd."""
        if args[:1] == ("run",) and "--control" not in args:
            return (*args, "--control", str(self.control))
        return args

    def run(self, *args: str, timeout: float = 30.0) -> Result:
        args = self._with_control(args)
        proc = subprocess.run(
            procd_command(*args), cwd=self.path, capture_output=True, text=True, timeout=timeout, check=False
        )
        records = parse_records(proc.stderr) if args[:1] == ("run",) and proc.returncode in (0, 1) else []
        return Result(proc.returncode, proc.stdout, proc.stderr, records)

    def start_ready(self, log: str = "log.jsonl", timeout: float = 15.0) -> Started:
        """``procd run`` this workspace's pipeline with a log file; return once it is ready."""
        proc = self.start("run", f"{self.name}.toml", "--log-file", log)
        try:
            wait_until(lambda: any(r["event"] == "pipeline_ready" for r in read_records(self.path / log)), timeout)
        except AssertionError:
            proc.kill()
            proc.communicate()
            raise
        return proc

    def start_quiet(self, log: str = "log.jsonl") -> subprocess.Popen[bytes]:
        """``procd run`` this workspace's pipeline with a log file, its standard streams on
        /dev/null (nothing to read, so no pipe can fill and stall it)."""
        return subprocess.Popen(
            procd_command(*self._with_control(("run", f"{self.name}.toml", "--log-file", log))),
            cwd=self.path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def run_on_pty(self, *args: str, timeout: float = 30.0) -> tuple[int, bytes]:
        """Run ``procd`` with stdout and stderr on a pseudo-terminal; its exit code and screen."""
        import pty
        import select

        main, secondary = pty.openpty()
        proc = subprocess.Popen(
            procd_command(*self._with_control(args)),
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=secondary,
            cwd=self.path,
        )
        os.close(secondary)
        screen = b""
        try:
            while select.select([main], [], [], timeout)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the pty closed: procd is done
                    break
                if not chunk:
                    break
                screen += chunk
            return proc.wait(timeout=timeout), screen
        finally:
            os.close(main)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def start(self, *args: str) -> Started:
        """Start ``procd ARGS`` in the background; its output goes to files (see ``Started``)."""
        args = self._with_control(args)
        self._started += 1
        streams = self.path.parent / f"{self.path.name}-streams"  # beside the workspace, not in it
        streams.mkdir(exist_ok=True)
        return Started(
            procd_command(*args), self.path, streams / f"{self._started}.out", streams / f"{self._started}.err"
        )


class Started(subprocess.Popen[str]):
    """A background ``procd`` whose standard output and error go to files, not pipes: nobody has
    to read them while it runs, so a supervisor that logs a lot never blocks on a full pipe.
    ``communicate`` waits for it and returns what the files hold."""

    def __init__(self, args: list[str], cwd: Path, out: Path, err: Path) -> None:
        self.out_path, self.err_path = out, err
        with open(out, "w") as stdout, open(err, "w") as stderr:
            super().__init__(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True)

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        assert input is None, "a started procd reads nothing from its standard input"
        self.wait(timeout)
        return self.out_path.read_text(), self.err_path.read_text()


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """Whatever the block does, ``proc`` has ended (killed if it must be) and is reaped after it."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def ws(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Workspace]:
    name = "t" + str(abs(hash(request.node.nodeid)) % 10**8)
    yield Workspace(tmp_path, name)
    leftovers = processes_titled(f"procd: {name}")
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture(autouse=True)
def no_child_left_behind() -> Iterator[None]:
    yield
    try:
        pid, _status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return
    raise AssertionError(f"a child process was left behind (pid {pid})" if pid else "a child is still running")


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The wheelhouse, made here if ``.ci/run`` has not (the one time a test may use the network)."""
    missing = [name for name in WHEELS if not list(WHEELHOUSE.glob(f"{name}-*.whl"))]
    if missing:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--dest", str(WHEELHOUSE), *WHEELS],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(
                f"the wheelhouse {WHEELHOUSE} lacks {', '.join(missing)} and pip could not download them "
                f"(run .ci/run, or: pip download --dest .wheelhouse {' '.join(WHEELS)}):\n{done.stderr[-2000:]}"
            )
    return WHEELHOUSE


@pytest.fixture
def offline_pip(wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip, as procd runs it to build a pipeline's environment, installs from the wheelhouse only."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 512 KiB (tmpfs), mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem refuses more (ENOSPC); return it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler
