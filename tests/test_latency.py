"""A function producer's batching adapts to its pace (issue 12, the latency row): once it has
sent, an item that comes when nothing was sent for ``linger`` goes downstream at once, from the
producer's own thread, however long ``linger`` is; an item that comes sooner waits, at most
``linger``, for a batch to fill; a fast producer sends whole batches. These tests assert what is
sent and what is held; the latency itself is bench/latency.py's."""

from __future__ import annotations

import json
import signal

from conftest import Started, Workspace, wait_until

STAGES = """
import os, time

def two_pause_one(pause):
    '''A whole batch (of 2) at once, then one item after ``pause``, then nothing for an hour.'''
    yield from range(2)
    time.sleep(pause)
    open("yielding", "w").close()
    yield 2
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

SINK = '[stages.sink]\nfunction = "st:Record"\ninputs = ["blocked"]\noptions = { path = "got.txt" }\n'


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
    """``linger = "4s"``: the first two items are a whole batch, sent at once; the third comes
    4.3 s after that send, so the producer is slow and sends it itself: it reaches the sink while
    the generator blocks, well before the ticker's linger would have sent it (4 s after it)."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:two_pause_one"\noptions = { pause = 4.3 }\nlinger = "4s"\n'
        + SINK
        + "queue = { batch = 2 }\n"
    )
    proc = ws.start_ready()
    try:
        wait_until(lambda: _received(ws) == ["0", "1"], timeout=10)
        wait_until(lambda: (ws.path / "yielding").exists(), timeout=15)
        wait_until(lambda: _received(ws) == ["0", "1", "2"], timeout=3)  # the ticker would take 4 s
    finally:
        _stop(proc)


def test_an_item_that_comes_soon_after_a_send_waits_for_linger(ws: Workspace) -> None:
    """``linger = "1m"``: the first two items are a whole batch, sent at once; the third comes
    right after that send, so it begins a batch: counted, held, and sent by the stop."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:three_then_block"\nlinger = "1m"\n' + SINK + "queue = { batch = 2 }\n"
    )
    proc = ws.start_ready()
    try:
        wait_until(lambda: _stages(ws).get("blocked", {}).get("items_out") == 3, timeout=10)
        wait_until(lambda: _received(ws) == ["0", "1"], timeout=10)
        assert _stages(ws)["sink"]["items_in"] == 2
    finally:
        _stop(proc)
    assert _received(ws) == ["0", "1", "2"]


def test_a_fast_producer_sends_whole_batches(ws: Workspace) -> None:
    """1,000 items at once, batches of 100, into a stage that holds its first batch: ten
    messages, seen as the queue's depth (nine waiting), none of them split by the adaptive path.
    ``linger = "10s"`` keeps the ticker out of it, so the count does not depend on the
    machine's load."""
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
        assert stages["gate"]["items_in"] == 100
        assert stages["gate"]["queue"]["depth_batches"] == 9
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
    ws.pipeline('[stages.blocked]\nfunction = "st:three_then_block"\nlinger = "0s"\n' + SINK)
    proc = ws.start_ready()
    try:
        wait_until(lambda: _received(ws) == ["0", "1", "2"], timeout=10)
    finally:
        _stop(proc)
