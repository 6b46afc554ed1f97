"""procd top against a real daemon: a snapshot in a pipe, a live view on a pty that q quits."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time

from conftest import Workspace, procd_command

STAGES = """
import itertools, time
def ticks():
    for n in itertools.count():
        yield n
        if n % 10 == 0:
            time.sleep(0.001)
def same(n):
    return n
"""


def _start(ws: Workspace) -> subprocess.Popen[str]:
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.ticks]\nfunction = "st:ticks"\n'
        '[stages.same]\nfunction = "st:same"\ninputs = ["ticks"]\nprocesses = 2\n'
    )
    return ws.start_ready()


def test_top_without_a_terminal_prints_one_snapshot(ws: Workspace) -> None:
    proc = _start(ws)
    try:
        time.sleep(1.2)  # workers report their counts once a second
        result = ws.run("top", "--control", str(ws.control))
        assert result.code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"procd top — {ws.name}  pid {proc.pid}  running")
        assert lines[1].split() == ["STAGE", "PROCS", "STATES", "IN/s", "OUT/s", "QUEUE", "RESTARTS", "DEAD"]
        same = next(line for line in lines if line.startswith("same "))
        assert same.split()[1] == "2"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_top_on_a_terminal_redraws_until_q(ws: Workspace) -> None:
    proc = _start(ws)
    main, secondary = pty.openpty()
    viewer = subprocess.Popen(
        procd_command("top", "--control", str(ws.control)),
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=ws.path,
        start_new_session=True,
    )
    os.close(secondary)
    try:
        screen = b""
        deadline = time.monotonic() + 15
        while screen.count(b"(q quits)") < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                screen += os.read(main, 65536)
        assert screen.count(b"\033[H\033[2J") >= 2  # redrawn in place
        assert b"STAGE" in screen and b"same" in screen
        os.write(main, b"q")
        assert viewer.wait(timeout=10) == 0
    finally:
        if viewer.poll() is None:
            viewer.kill()
            viewer.wait()
        os.close(main)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
