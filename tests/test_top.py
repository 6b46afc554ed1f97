"""procd top against a real daemon: a snapshot in a pipe, a live view on a pty that q quits."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time

from conftest import Workspace, procd_command, wait_until

STAGES = """
import itertools, time
def ticks():
    for n in itertools.count():
        yield n
        if n % 10 == 0:
            time.sleep(0.001)
def same(n):
    return n
def paced():
    for n in itertools.count():
        yield n
        time.sleep(0.01)
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
        wait_until(lambda: json.loads(ws.run("status", "--json", "--control", str(ws.control)).stdout)["items_per_s"])
        result = ws.run("top", "--control", str(ws.control))
        assert result.code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert re.fullmatch(
            rf"procd top — {ws.name}  pid {proc.pid}  running  up \d+s  [\d,]+ items/s into the sinks \(last \d+s\)",
            lines[0],
        )
        assert lines[1].split() == [
            "STAGE",
            "PROCS",
            "STATES",
            "IN",
            "OUT",
            "IN/s",
            "OUT/s",
            "QUEUE",
            "RESTARTS",
            "DEAD",
        ]
        same = next(line.split() for line in lines if line.startswith("same "))
        assert same[1] == "2"
        assert int(same[-5].replace(",", "")) > 0  # IN/s: one reply carries the supervisor's rates
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_the_rate_is_what_leaves_through_the_sinks(ws: Workspace) -> None:
    """A producer of at most 100 items/s through two more stages: the rate is that of the sink,
    not the sum of every stage's items in and out, and it is not 0 for a young pipeline."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.paced]\nfunction = "st:paced"\n'
        '[stages.same]\nfunction = "st:same"\ninputs = ["paced"]\nqueue = { maxsize = 10, batch = 1 }\n'
        '[stages.sink]\nfunction = "st:same"\ninputs = ["same"]\nqueue = { maxsize = 10, batch = 1 }\n'
    )
    proc = ws.start_ready()
    try:

        def status() -> dict:
            return json.loads(ws.run("status", "--json", "--control", str(ws.control)).stdout)

        reply = wait_until(lambda: (r := status())["stages"][2]["items_in"] > 0 and r, timeout=15)
        assert reply["rate_window_s"] <= 10.0
        later = wait_until(lambda: (r := status())["items_per_s"] > 0 and r, timeout=15)
        # sleep only slows the producer: 100/s is a ceiling (with slack for counts reported late)
        assert 0 < later["items_per_s"] <= 120
        sink = later["stages"][2]
        assert later["items_per_s"] == sink["items_in_per_s"]
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


def test_logs_summary_of_a_running_pipeline_says_what_its_counts_cover(ws: Workspace) -> None:
    proc = _start(ws)
    try:
        running = ws.run("logs", "log.jsonl", "--summary")
        assert running.code == 0
        assert running.stdout.splitlines()[-1] == (
            "IN and OUT count only workers that have exited: 3 have no exit record yet "
            "(still running, or the log ends early); procd status shows their latest counts."
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    ended = ws.run("logs", "log.jsonl", "--summary")
    assert "no exit record" not in ended.stdout and ended.stdout.splitlines()[0].split()[0] == "STAGE"
