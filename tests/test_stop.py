"""Stopping at any moment: a signal early in start-up, and a forced stop that says what forced it
and counts what it abandoned."""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import Workspace, read_records, reaped, wait_until

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
    proc = ws.start_quiet()
    with reaped(proc):
        wait_until(lambda: _blocks_sigterm(proc.pid) or proc.poll() is not None, timeout=10, interval=0.0005)
        time.sleep(delay_s)  # the moment of the signal is what this test varies
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0
    records = read_records(ws.path / "log.jsonl")
    assert [r["event"] for r in records if r["event"] in ("stop_requested", "pipeline_stopped")] == [
        "stop_requested",
        "pipeline_stopped",
    ]
    assert records[-1]["outcome"] == "stopped"


STUBBORN = """
import itertools, signal, time

def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield from itertools.count()

def slow(n):
    time.sleep(0.05)
"""


def _forced_stop(ws: Workspace, stop_timeout: str, second_signal: bool) -> list[dict]:
    ws.write("st.py", STUBBORN)
    ws.pipeline(
        f'[pipeline]\nname = "{{name}}"\nstop_timeout = "{stop_timeout}"\n'
        '[stages.stubborn]\nfunction = "st:stubborn"\n'
        '[stages.slow]\nfunction = "st:slow"\ninputs = ["stubborn"]\nqueue = { maxsize = 100, batch = 10 }\n'
    )
    proc = ws.start_ready()
    log = ws.path / "log.jsonl"
    with reaped(proc):
        # the producer fills the queue (10 batches) and waits; the reader holds one batch
        wait_until(lambda: processes_blocked_writing(ws), timeout=15)
        proc.send_signal(signal.SIGINT)
        if second_signal:
            wait_until(lambda: any(r["event"] == "stop_requested" for r in read_records(log)))
            proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 1
    return read_records(log)


def processes_blocked_writing(ws: Workspace) -> bool:
    """The producer's queue is full: ``procd status`` shows it blocked on its output."""
    result = ws.run("status", "--control", str(ws.control), "--json")
    if result.code != 0:
        return False
    stages = {s["name"]: s for s in json.loads(result.stdout)["stages"]}
    queue = stages["slow"]["queue"]
    return queue["depth_batches"] == queue["capacity_batches"] == 10


def test_a_second_ctrl_c_says_it_forced_the_stop_and_counts_what_was_abandoned(ws: Workspace) -> None:
    records = _forced_stop(ws, "30s", second_signal=True)
    escalated = [r for r in records if r["event"] == "stop_escalated"]
    assert [r["forced_by"] for r in escalated] == ["second_signal", "second_signal"]
    assert all("second stop request (SIGINT)" in r["message"] and "30s" not in r["message"] for r in escalated)
    exits = [r for r in records if r["event"] == "worker_exited"]
    assert {r["cause"] for r in exits} == {"killed by SIGKILL after a second stop request (SIGINT)"}
    (abandoned,) = [r for r in records if r["event"] == "stage_abandoned"]
    assert abandoned["stage"] == "slow"
    assert (abandoned["queued_batches"], abandoned["queued_items_at_most"], abandoned["in_hand_items"]) == (10, 100, 10)
    stopped = records[-1]
    assert stopped["event"] == "pipeline_stopped" and stopped["forced_by"] == "a second stop request (SIGINT)"
    assert stopped["abandoned"] == {"queued_batches": 10, "queued_items_at_most": 100, "in_hand_items": 10}


def test_a_stop_timeout_says_it_forced_the_stop(ws: Workspace) -> None:
    records = _forced_stop(ws, "300ms", second_signal=False)
    escalated = [r for r in records if r["event"] == "stop_escalated"]
    assert [r["forced_by"] for r in escalated] == ["stop_timeout", "stop_timeout"]
    assert escalated[0]["message"] == (
        "stubborn[0] still running 0.3s after the stop request; sending SIGKILL to its process group"
    )
    stopped = records[-1]
    assert stopped["forced_by"] == "the stop timeout (0.3s)"
    assert stopped["abandoned"]["queued_batches"] == 10 and stopped["abandoned"]["in_hand_items"] == 10


PIPED = """
def numbers(count):
    yield from range(count)

class Record:
    '''Appends every item to a file as it comes (what a killed sink received stays counted).'''
    def __init__(self, path):
        self.out = open(path, "a", buffering=1)
    def __call__(self, item):
        self.out.write(f"{item}\\n")
"""


def test_a_forced_stop_counts_what_a_command_stage_held_as_abandoned_in_hand(ws: Workspace) -> None:
    """Items a command stage took in and never handed on (in its program's stdin pipe, or inside
    the program) are abandoned in hand, like a function stage's batch."""
    count = 5000
    ws.write("st.py", PIPED)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "30s"\n'
        f'[stages.numbers]\nfunction = "st:numbers"\noptions = {{ count = {count} }}\n'
        '[stages.mid]\ncommand = ["sh", "-c", "while read l; do sleep 0.02; echo \\"$l\\"; done"]\n'
        'inputs = ["numbers"]\nqueue = { maxsize = 10000, batch = 1000 }\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["mid"]\noptions = { path = "got.txt" }\n'
        "queue = { maxsize = 10000, batch = 1 }\n"
    )
    proc = ws.start_ready()
    log = ws.path / "log.jsonl"
    got = ws.path / "got.txt"
    with reaped(proc):
        wait_until(lambda: got.exists() and len(got.read_text().splitlines()) >= 5, timeout=15)
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: any(r["event"] == "stop_requested" for r in read_records(log)))
        time.sleep(0.3)  # the interval between the two Ctrl-C is what the issue reports
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 1
    records = read_records(log)
    abandoned = {r["stage"]: r for r in records if r["event"] == "stage_abandoned"}
    delivered = len(got.read_text().splitlines())
    mid = abandoned["mid"]
    sink = abandoned.get("sink", {"queued_batches": 0, "in_hand_items": 0})
    # every item is delivered, or counted where it was abandoned (the sink's batches are 1 item)
    assert mid["in_hand_items"] > 0
    assert (
        mid["queued_items_at_most"] + mid["in_hand_items"] + sink["queued_batches"] + sink["in_hand_items"] + delivered
        >= count
    )
    assert records[-1]["abandoned"]["in_hand_items"] >= mid["in_hand_items"]
