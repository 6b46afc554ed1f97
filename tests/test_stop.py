"""Stopping at any moment: a signal early in start-up, and a forced stop that says what forced it
and counts what it abandoned."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import Workspace, procd_command, read_records, wait_until

TICKS = """
import time

def ticks():
    n = 0
    while True:
        yield n
        n += 1
        time.sleep(0.01)

def sink(n):
    pass
"""


def _blocks_sigterm(pid: int) -> bool:
    """procd holds SIGTERM from its first line: once it runs (its command line is procd's), the
    bit is in /proc/PID/status SigBlk."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"procd" not in fh.read():
                return False  # not exec'd yet
        with open(f"/proc/{pid}/status") as fh:
            blocked = next(line for line in fh if line.startswith("SigBlk:"))
    except (OSError, StopIteration):
        return False
    mask = int(blocked.split()[1], 16)
    # SIGTERM held, SIGCHLD not: procd's own mask (a fork blocks every signal for a moment)
    return bool(mask & (1 << (signal.SIGTERM - 1))) and not mask & (1 << (signal.SIGCHLD - 1))


@pytest.mark.parametrize("delay_s", [0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16])
def test_sigterm_at_any_moment_of_start_up_ends_with_a_documented_code(ws: Workspace, delay_s: float) -> None:
    ws.write("st.py", TICKS)
    ws.pipeline('[stages.ticks]\nfunction = "st:ticks"\n[stages.sink]\nfunction = "st:sink"\ninputs = ["ticks"]\n')
    proc = subprocess.Popen(
        procd_command("run", f"{ws.name}.toml", "--log-file", "log.jsonl", "--control", str(ws.control)),
        cwd=ws.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _blocks_sigterm(proc.pid) or proc.poll() is not None, timeout=10, interval=0.0005)
        time.sleep(delay_s)  # the moment of the signal is what this test varies
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    records = read_records(ws.path / "log.jsonl")
    assert [r["event"] for r in records if r["event"] in ("stop_requested", "pipeline_stopped")] == [
        "stop_requested",
        "pipeline_stopped",
    ]
    assert records[-1]["outcome"] == "stopped"
