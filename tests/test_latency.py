"""A function producer's batching adapts to its pace (issue 12, the latency row): an item that
comes when nothing was sent for ``linger`` goes downstream at once, from the producer's own
thread, however long ``linger`` is; a fast producer still sends whole batches. These tests assert
what is sent and held, never how fast: the latency itself is bench/latency.py's."""

from __future__ import annotations

import json
import signal

from conftest import Started, Workspace, wait_until

STAGES = """
import os, time

def once_then_block():
    yield 0
    time.sleep(3600)

def three_then_block():
    yield from range(3)
    time.sleep(3600)

def numbers(count):
    yield from range(count)

class Record:
    def __init__(self, path):
        self.out = open(path, "a", buffering=1)
    def __call__(self, item):
        self.out.write(f"{item}\\n")

class Gate:
    '''Holds its first item (and so the batch it came in) until the file "go" exists.'''
    def __init__(self):
        self.open = False
    def __call__(self, item):
        while not self.open:
            self.open = os.path.exists("go")
            time.sleep(0.01)
        return item
"""


def _stages(ws: Workspace) -> dict[str, dict]:
    result = ws.run("status", "--json", "--control", str(ws.control))
    return {s["name"]: s for s in json.loads(result.stdout)["stages"]} if result.code == 0 else {}


def _received(ws: Workspace) -> list[str]:
    got = ws.path / "got.txt"
    return got.read_text().split() if got.exists() else []


def _stop(proc: Started) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_an_item_that_comes_when_nothing_was_sent_for_linger_goes_at_once(ws: Workspace) -> None:
    """``linger = "10s"``, and the producer has sent nothing yet: its one item reaches the sink
    while the generator is still blocked, long before a ticker's linger would have sent it."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:once_then_block"\nlinger = "10s"\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["blocked"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    try:
        wait_until(lambda: _received(ws) == ["0"], timeout=5)
    finally:
        _stop(proc)


def test_items_that_come_soon_after_a_send_wait_for_linger(ws: Workspace) -> None:
    """``linger = "1m"``: the first item goes at once (nothing was sent before it); the next two
    come right after that send, so they are a batch in the making: counted, held, and sent by
    the stop."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:three_then_block"\nlinger = "1m"\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["blocked"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    try:
        wait_until(lambda: _stages(ws).get("blocked", {}).get("items_out") == 3, timeout=10)
        wait_until(lambda: _received(ws) == ["0"], timeout=10)
        assert _stages(ws)["sink"]["items_in"] == 1
    finally:
        _stop(proc)
    assert _received(ws) == ["0", "1", "2"]


def test_a_fast_producer_sends_whole_batches(ws: Workspace) -> None:
    """1,000 items at once, batches of 100, into a stage that holds its first batch: 11
    messages, seen as the queue's depth (10 waiting): the first item alone (nothing was sent
    before it), then nine whole batches, then the last 99 at the generator's end. ``linger =
    "10s"`` keeps the ticker out of it, so the count does not depend on the machine's load."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 1000 }\nlinger = "10s"\n'
        '[stages.gate]\nfunction = "st:Gate"\ninputs = ["numbers"]\nqueue = { maxsize = 10000, batch = 100 }\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["gate"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    try:
        wait_until(lambda: _stages(ws).get("numbers", {}).get("finished"), timeout=10)
        wait_until(lambda: _stages(ws)["gate"]["items_in"] > 0, timeout=10)  # it holds its first batch
        stages = _stages(ws)
        assert stages["numbers"]["items_out"] == 1000
        assert stages["gate"]["queue"]["depth_batches"] == 10
    finally:
        (ws.path / "go").touch()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert _received(ws) == [str(n) for n in range(1000)]


def test_linger_0s_sends_every_part_filled_batch_at_once(ws: Workspace) -> None:
    """``linger = "0s"``: the ticker sends whatever is pending as soon as a batch has begun
    (as before adaptive batching), so all three items reach the sink while the generator
    blocks."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:three_then_block"\nlinger = "0s"\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["blocked"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    try:
        wait_until(lambda: _received(ws) == ["0", "1", "2"], timeout=10)
    finally:
        _stop(proc)
