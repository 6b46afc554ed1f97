"""A producer's items and counts leave it on time whatever its generator does: a part-filled
batch goes downstream about a millisecond after its first item, and counts reach the supervisor
at least once a second while they change, even while the generator blocks between yields
(issue 13 item 5, issue 12)."""

from __future__ import annotations

import json
import signal

from conftest import Workspace, wait_until

STAGES = """
import itertools, json, time

def slow():
    for n in itertools.count():
        yield n
        time.sleep(0.01)

def three_then_block():
    yield from range(3)
    time.sleep(3600)

class Record:
    def __init__(self, path):
        self.out = open(path, "a", buffering=1)
    def __call__(self, item):
        self.out.write(f"{item}\\n")
"""


def _status(ws: Workspace) -> dict[str, dict]:
    result = ws.run("status", "--json", "--control", str(ws.control))
    return {s["name"]: s for s in json.loads(result.stdout)["stages"]} if result.code == 0 else {}


def test_a_slow_producer_s_counts_are_reported_while_it_runs(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.slow]\nfunction = "st:slow"\n[stages.sink]\nfunction = "st:Record"\ninputs = ["slow"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    try:
        first = wait_until(lambda: (s := _status(ws)) and s["slow"]["items_out"] > 0 and s, timeout=10)
        assert first["sink"]["items_in"] > 0
        wait_until(lambda: _status(ws)["slow"]["items_out"] > first["slow"]["items_out"], timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_producer_that_blocks_after_yielding_hands_its_items_on_and_reports_them(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:three_then_block"\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["blocked"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    got = ws.path / "got.txt"
    try:
        wait_until(lambda: got.exists() and got.read_text().split() == ["0", "1", "2"], timeout=10)
        wait_until(lambda: _status(ws).get("blocked", {}).get("items_out") == 3, timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_linger_is_how_long_a_producer_holds_a_part_filled_batch(ws: Workspace) -> None:
    """``linger = "1m"``: the three items are counted (reported) but held; a stop sends them."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:three_then_block"\nlinger = "1m"\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["blocked"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    got = ws.path / "got.txt"
    try:
        wait_until(lambda: _status(ws).get("blocked", {}).get("items_out") == 3, timeout=10)
        assert not got.exists() or got.read_text() == ""
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert got.read_text().split() == ["0", "1", "2"]
