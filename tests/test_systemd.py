"""procd@.service under a real systemd (Debian's 252) as PID 1 of fresh namespaces.

That systemd must not touch the host, so tests/systemd/boot.sh makes / private, mounts tmpfs on
/run, overlays /etc, /var and /opt on a tmpfs, gives it a private /dev whose console is a pty
read here, makes /sys, /proc/sys and sysrq read-only, mounts cgroup2 of its own cgroup namespace
(rooted in a cgroup made for the test), loads only the test's units, and runs with
DefaultLimitCORE=0. The fixture kills that PID 1 and removes its cgroup even when a test fails,
and asserts the host's mounts, /tmp and cgroups are as they were.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, processes_titled, wait_until

BOOT = Path(__file__).parent / "systemd" / "boot.sh"
TOOLS = ("unshare", "nsenter", "mount", "setsid", "useradd", "runuser")


def _cgroup2() -> Path | None:
    """This process's cgroup in the cgroup2 hierarchy, if there is one."""
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            mount = Path(fields[4])
    own = next(
        (line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")), None
    )
    return None if mount is None or own is None else mount / own.lstrip("/")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not Path("/lib/systemd/systemd").exists():
        return f"needs {', '.join(missing) or '/lib/systemd/systemd'} (Debian packages util-linux, systemd, passwd)"
    if _cgroup2() is None:
        return "needs a cgroup2 hierarchy"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))

STAGES = """
import itertools, os, time
if os.environ.get("PROCD_TEST_SLOW_IMPORT"):
    time.sleep(float(os.environ["PROCD_TEST_SLOW_IMPORT"]))

def ticks():
    for n in itertools.count():
        yield n
        time.sleep(0.01)

def work(n):
    return n
"""

PIPELINE = """
[pipeline]
name = "etl"
stop_timeout = "5s"
[stages.ticks]
function = "svc:ticks"
[stages.work]
function = "svc:work"
inputs = ["ticks"]
processes = 2
"""


def _host_state() -> tuple[str, list[str], list[str]]:
    """The host's mounts (as this process sees them), systemd's entries in /tmp, and the cgroups
    beside ours (another test session's own test cgroup aside)."""
    own = f"procd-test-{os.getpid()}"
    cgroups = sorted(
        p.name
        for p in (_cgroup2() or Path("/")).iterdir()
        if p.is_dir() and (p.name == own or not re.fullmatch(r"procd-test-\d+", p.name))
    )
    # what this systemd could leave in /tmp (PrivateTmp='s directories); other sessions on the
    # host come and go in /tmp meanwhile
    tmp = sorted(name for name in os.listdir("/tmp") if name.startswith("systemd-"))
    return Path("/proc/self/mountinfo").read_text(), tmp, cgroups


class Machine:
    """The systemd in the namespaces, driven with nsenter."""

    def __init__(self, pid1: int, console: bytearray) -> None:
        self.pid1 = pid1
        self.console = console

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *args], capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args}: {result.returncode} {result.stdout} {result.stderr}")
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.console.decode(errors="replace"))

    def write(self, path: str, text: str) -> None:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "sh", "-c", f'mkdir -p "$(dirname {path})" && cat > {path}'],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    before = _host_state()
    work = tmp_path_factory.mktemp("systemd")
    units, wheels, scratch = work / "units", work / "wheels", work / "scratch"
    for folder in (units, wheels, scratch):
        folder.mkdir()
    # The service's venv comes from Debian's /usr/bin/python3 (3.11.2), for which redis-py also
    # needs async-timeout (required below Python 3.11.3); this interpreter resolves without it.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "async-timeout>=4.0.3", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    shutil.copy(REPO / "systemd" / "procd@.service", units)
    (units / "procd-test.target").write_text("[Unit]\nDescription=procd test\nDefaultDependencies=no\n")
    for name in (
        "sysinit",
        "basic",
        "shutdown",
        "network",
        "network-online",
        "multi-user",
        "sockets",
        "paths",
        "timers",
        "local-fs",
    ):
        (units / f"{name}.target").write_text(f"[Unit]\nDescription=stand-in {name}\n")

    cgroup = _cgroup2() / f"procd-test-{os.getpid()}"  # type: ignore[operator]
    cgroup.mkdir()
    main, secondary = pty.openpty()
    console = bytearray()

    def read_console() -> None:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                return
            if not chunk:
                return
            console.extend(chunk)

    threading.Thread(target=read_console, daemon=True).start()
    # setsid -f: the launcher is not this process's child, so no test sees it as one left behind
    pidfile, boot_log = work / "unshare.pid", work / "boot.log"
    command = (
        f"echo $$ > {pidfile} && echo $$ > {cgroup}/cgroup.procs && exec unshare --fork --pid --mount --uts "
        f"--ipc --net --cgroup --mount-proc {BOOT} {scratch} {os.ttyname(secondary)} {units} {wheels} "
        f"> {boot_log} 2>&1"
    )
    subprocess.run(["setsid", "-f", "sh", "-c", command], stdin=subprocess.DEVNULL, check=True, timeout=30)
    pid1 = 0
    try:
        unshare = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30))

        def first_child() -> list[str]:
            try:
                return Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
            except OSError:
                return ["dead"]

        children = wait_until(first_child, timeout=30)
        assert children != ["dead"], boot_log.read_text()
        pid1 = int(children[0])
        host = Machine(pid1, console)
        wait_until(
            lambda: host.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded"),
            timeout=60,
            interval=0.2,
        )
        host.write("/etc/procd/svc.py", STAGES)
        host.write("/etc/procd/etl.toml", PIPELINE)
        yield host
    finally:
        if pid1:
            try:
                os.kill(pid1, signal.SIGKILL)  # PID 1 of the namespace: every process in it goes too
            except ProcessLookupError:
                pass
        if pid1:
            wait_until(lambda: not Path(f"/proc/{pid1}").exists(), timeout=30)
        if (cgroup / "cgroup.kill").exists():
            (cgroup / "cgroup.kill").write_text("1")
        for _ in range(50):
            leftovers = [d for d in sorted(cgroup.rglob("*"), key=lambda p: -len(p.parts)) if d.is_dir()]
            try:
                for d in [*leftovers, cgroup]:
                    d.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        os.close(secondary)
        os.close(main)
        after = _host_state()
        assert after[0] == before[0], "the host's mounts changed"
        assert after[1] == before[1], "the host's /tmp changed"
        assert after[2] == before[2], "the host's cgroups changed"


def _workers(stage: str) -> dict[int, str]:
    return processes_titled(f"procd: etl/{stage}[")


def test_active_only_after_ready_and_a_worker_killed_is_procd_s_business(machine: Machine) -> None:
    machine.write(
        "/run/systemd/system/procd@.service.d/slow.conf", "[Service]\nEnvironment=PROCD_TEST_SLOW_IMPORT=1.5\n"
    )
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "start", "--no-block", "procd@etl")
    assert machine.show("procd@etl", "ActiveState")["ActiveState"] == "activating"  # workers still importing
    wait_until(lambda: machine.show("procd@etl", "ActiveState")["ActiveState"] == "active", timeout=30)
    assert len(_workers("work")) == 2
    assert "pipeline_ready" in machine.text()  # procd's records, in their console form on a tty
    before = machine.show("procd@etl", "MainPID", "NRestarts")
    victim = next(iter(_workers("work")))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(_workers("work")) == 2 and victim not in _workers("work"), timeout=10)
    assert machine.show("procd@etl", "MainPID", "NRestarts") == before  # procd restarted it, not systemd
    machine.run("rm", "/run/systemd/system/procd@.service.d/slow.conf")
    machine.run("systemctl", "daemon-reload")


def test_reload_rereads_the_pipeline(machine: Machine) -> None:
    wait_until(lambda: machine.show("procd@etl", "ActiveState")["ActiveState"] == "active", timeout=30)
    ticks = set(_workers("ticks"))
    machine.write("/etc/procd/etl.toml", PIPELINE.replace("processes = 2", "processes = 3"))
    machine.run("systemctl", "reload", "procd@etl")
    wait_until(lambda: len(_workers("work")) == 3, timeout=20)
    assert set(_workers("ticks")) == ticks  # untouched
    assert machine.show("procd@etl", "ActiveState")["ActiveState"] == "active"
    assert "pipeline_reloaded" in machine.text()


def _ids(pid: int) -> set[int]:
    """Every uid of a process (real, effective, saved, filesystem)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return {int(n) for n in line.split()[1:]}


def test_the_service_runs_as_its_user_and_procd_status_reaches_it(machine: Machine) -> None:
    wait_until(lambda: machine.show("procd@etl", "ActiveState")["ActiveState"] == "active", timeout=30)
    uid = int(machine.run("id", "-u", "procd").stdout)
    assert uid != 0
    (supervisor,) = processes_titled("procd: etl supervisor")
    for pid in [supervisor, *_workers("ticks"), *_workers("work")]:
        assert _ids(pid) == {uid}  # stage code never runs as root
    assert os.readlink(f"/proc/{supervisor}/cwd") == "/var/lib/procd/etl"  # the instance's own
    owners = machine.run("stat", "-c", "%n %U %a", "/run/procd", "/run/procd/etl.sock", "/var/lib/procd/etl")
    assert owners.stdout.splitlines() == [
        "/run/procd procd 700",
        "/run/procd/etl.sock procd 600",
        "/var/lib/procd/etl procd 755",
    ]
    main_pid = machine.show("procd@etl", "MainPID")["MainPID"]
    # procd on PATH, as root (the README's commands), by name and as the only pipeline
    for args in (("procd", "status", "etl"), ("procd", "status")):
        status = machine.run(*args)
        assert status.stdout.splitlines()[0].startswith(f"pipeline etl  pid {main_pid}  running"), status.stdout
    # and as the service's own user, whose default place is elsewhere: the search finds it
    as_user = machine.run("runuser", "-u", "procd", "--", "procd", "status", "etl", "--json")
    assert f'"pid": {main_pid}' in as_user.stdout
    # a stop over the control socket: a clean drain, exit 0, the outcome says it was stopped
    machine.run("procd", "stop", "etl")
    wait_until(lambda: machine.show("procd@etl", "ActiveState")["ActiveState"] == "inactive", timeout=30)
    assert machine.show("procd@etl", "Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
    assert re.search(r"pipeline_stopped .*outcome=stopped", machine.text())
    machine.run("systemctl", "start", "procd@etl")


def test_stop_drains_and_leaves_nothing_for_systemd_to_kill(machine: Machine) -> None:
    machine.run("systemctl", "stop", "procd@etl")
    state = machine.show("procd@etl", "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert not processes_titled("procd: etl")
    text = machine.text()
    assert "Killing process" not in text, text[-2000:]
    assert re.search(r"pipeline_stopped .*exit_code=0", text)


def test_a_stuck_supervisor_is_killed_by_the_watchdog_and_restarted(machine: Machine) -> None:
    machine.write("/run/systemd/system/procd@.service.d/watchdog.conf", "[Service]\nWatchdogSec=2s\nRestartSec=200ms\n")
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "start", "procd@etl")
    first = machine.show("procd@etl", "MainPID")["MainPID"]
    (supervisor,) = processes_titled("procd: etl supervisor")
    os.kill(supervisor, signal.SIGSTOP)  # the loop stops answering
    wait_until(lambda: machine.show("procd@etl", "NRestarts")["NRestarts"] == "1", timeout=30)
    wait_until(lambda: machine.show("procd@etl", "ActiveState")["ActiveState"] == "active", timeout=30)
    assert machine.show("procd@etl", "MainPID")["MainPID"] != first
    assert "Watchdog timeout" in machine.text()
    machine.run("systemctl", "stop", "procd@etl")
    machine.run("rm", "/run/systemd/system/procd@.service.d/watchdog.conf")
    machine.run("systemctl", "daemon-reload")


def test_a_bad_pipeline_fails_with_78_and_does_not_restart(machine: Machine) -> None:
    machine.write("/etc/procd/bad.toml", '[stages.a]\nfunction = "svc:ticks"\nprocesses = "four"\n')
    started = machine.run("systemctl", "start", "procd@bad", check=False)
    assert started.returncode != 0
    time.sleep(3)  # longer than RestartSec: a restart would have happened by now
    state = machine.show("procd@bad", "ActiveState", "NRestarts", "ExecMainStatus")
    assert state == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "78"}
    assert "stages.a.processes: expected an integer from 1 to " in machine.text()
