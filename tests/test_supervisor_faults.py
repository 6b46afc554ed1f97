"""Faults found in review of the supervisor (issue 9), each reproduced with real processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import Workspace, read_records, wait_until


def _process_with_pid(pid: int, attempts: int = 50) -> subprocess.Popen[bytes] | None:
    """Start a sleeping process that has pid ``pid`` and leads its own process group, by asking
    the kernel for that pid next (root writes /proc/sys/kernel/ns_last_pid); None if another
    process on the machine kept taking it."""
    for _ in range(attempts):
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(pid - 1))
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_the_final_sweep_never_signals_a_reaped_workers_reused_pid(ws: Workspace) -> None:
    """A worker that finished was reaped; its pid (and process group id) can belong to another
    process by the time procd ends. The sweep must not SIGKILL that process group."""
    ws.write(
        "st.py",
        """
        import time

        def once():
            yield 1

        def forever():
            while True:
                yield 0
                time.sleep(0.05)

        def sink(item):
            pass
        """,
    )
    ws.pipeline(
        """
        [pipeline]
        name = "{name}"
        [stages.once]
        function = "st:once"
        [stages.forever]
        function = "st:forever"
        [stages.sink]
        function = "st:sink"
        inputs = ["forever"]
        """
    )
    proc = ws.start_ready()
    innocent = None
    try:
        exited = wait_until(
            lambda: [
                r for r in read_records(ws.path / "log.jsonl") if r["event"] == "worker_exited" and r["stage"] == "once"
            ]
        )
        innocent = _process_with_pid(exited[0]["pid"])
        assert innocent is not None, "could not get the reaped worker's pid for a new process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        # procd's sweep ran before it exited: a SIGKILL it sent would end the process at once
        with pytest.raises(subprocess.TimeoutExpired):
            innocent.wait(timeout=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        if innocent is not None:
            innocent.kill()
            innocent.wait()
