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

def numbers(count):
    yield from range(count)

def three_then_block():
    yield from range(3)
    time.sleep(3600)

def pause_then_one_more():
    yield from range(3)
    time.sleep(0.3)  # the three are sent meanwhile, in the middle of the producer's batch
    yield 3
    time.sleep(3600)

def crawl(n):
    time.sleep(0.05)
    return n

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
        # each worker reports its counts on its own once-a-second tick: both come while it runs
        first = wait_until(
            lambda: (s := _status(ws)) and s["slow"]["items_out"] > 0 and s["sink"]["items_in"] > 0 and s, timeout=10
        )
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


def test_an_item_yielded_after_a_part_filled_batch_was_sent_is_sent_too(ws: Workspace) -> None:
    """The producer takes the rest of a batch in one C-level loop: once the ticker has sent the
    part-filled batch, the item yielded after it (the generator then blocks for good) must not
    wait for a batch that will never fill."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.blocked]\nfunction = "st:pause_then_one_more"\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["blocked"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    got = ws.path / "got.txt"
    try:
        wait_until(lambda: got.exists() and got.read_text().split() == ["0", "1", "2", "3"], timeout=10)
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


def test_a_consumer_in_a_long_batch_reports_its_counts(ws: Workspace) -> None:
    """One batch of 100 items at 50 ms each takes 5 s: the counts come while it is under way
    (before, they came only after each batch)."""
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 100 }\n'
        '[stages.crawl]\nfunction = "st:crawl"\ninputs = ["numbers"]\nqueue = { maxsize = 1000, batch = 100 }\n'
        '[stages.sink]\nfunction = "st:Record"\ninputs = ["crawl"]\noptions = { path = "got.txt" }\n'
    )
    proc = ws.start_ready()
    try:
        wait_until(lambda: 0 < _status(ws).get("crawl", {}).get("items_out", 0) < 100, timeout=10)
    finally:
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert len((ws.path / "got.txt").read_text().split()) == 100
