"""How a command stage's program starts: what it inherits from its bridge, and that it is tied to
its bridge and its supervisor (its exec failures: test_run.test_exec_failure_is_reported_with_its_errno)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import Workspace, parent_of, processes_titled, reaped, wait_until


def _programs(bridge: int) -> list[int]:
    """The bridge's children that have exec'd ``sleep``."""
    try:
        children = Path(f"/proc/{bridge}/task/{bridge}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in map(int, children):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "sleep":
                found.append(child)
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _bridge(ws: Workspace) -> int:
    """The one bridge (a program forked but not yet exec'd has its bridge's title too)."""

    def one() -> int | None:
        titled = {int(pid) for pid in processes_titled(f"procd: {ws.name}/work[0]")}
        bridges = [pid for pid in titled if parent_of(pid) not in titled]
        return bridges[0] if len(bridges) == 1 else None

    return int(wait_until(one, timeout=10))


def test_program_has_default_signals_and_no_procd_descriptor(ws: Workspace) -> None:
    ws.pipeline('[stages.work]\ncommand = ["sleep", "3600"]\n')
    with reaped(ws.start_ready()) as proc:
        (program,) = wait_until(lambda: _programs(_bridge(ws)), timeout=10)
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{program}/status").read_text().splitlines() if ":" in line
        )
        # nothing ignored (Python ignores SIGPIPE and SIGXFSZ in the bridge), blocked or caught
        assert {key: int(status[key], 16) for key in ("SigIgn", "SigBlk", "SigCgt")} == {
            "SigIgn": 0,
            "SigBlk": 0,
            "SigCgt": 0,
        }
        assert sorted(os.listdir(f"/proc/{program}/fd"), key=int) == ["0", "1", "2"]
        environ = Path(f"/proc/{program}/environ").read_bytes().split(b"\0")
        assert b"PYTHONUNBUFFERED=1" in environ
        assert os.getpgid(program) == _bridge(ws)  # in its bridge's process group
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_program_dies_with_its_bridge_and_a_new_one_starts(ws: Workspace) -> None:
    ws.pipeline('[stages.work]\ncommand = ["sleep", "3600"]\nrestart = { policy = "always", backoff = "0s" }\n')
    with reaped(ws.start_ready()) as proc:
        bridge = _bridge(ws)
        (program,) = wait_until(lambda: _programs(bridge), timeout=10)
        os.kill(bridge, signal.SIGKILL)
        wait_until(lambda: not _alive(program), timeout=5)  # PDEATHSIG: the program followed its bridge
        new_bridge = wait_until(lambda: (b := _bridge(ws)) != bridge and b, timeout=10)
        wait_until(lambda: _programs(new_bridge), timeout=10)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
