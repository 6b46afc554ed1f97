"""Durable (SQLite) queues with real SIGKILLs: everything killed, run again, nothing lost."""

from __future__ import annotations

import signal
import sqlite3

from conftest import Workspace, processes_titled, wait_until

STAGES = """
import os, time

def numbers(count, checkpoint):
    start = checkpoint.value or 0
    print("starting at", start, flush=True)
    for n in range(start, count):
        yield n
        if n % 50 == 49:
            checkpoint.save(n + 1)
        time.sleep(0.0005)

def plain(count):
    yield from range(count)

def same(n):
    return n

class Record:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    def __call__(self, n):
        os.write(self.fd, b"%d\\n" % n)
"""

PIPELINE = """
[pipeline]
name = "{name}"
state_dir = "state"
[stages.numbers]
function = "st:numbers"
options = { count = 3000 }
[stages.transform]
function = "st:same"
inputs = ["numbers"]
processes = 2
queue = { backend = "sqlite", path = "q1.sqlite", maxsize = 200, batch = 20 }
[stages.record]
function = "st:Record"
inputs = ["transform"]
options = { path = "seen.txt" }
queue = { backend = "sqlite", maxsize = 200, batch = 20 }
"""


def test_sigkill_everything_then_run_again_delivers_every_item(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(PIPELINE)
    seen = ws.path / "seen.txt"
    proc = ws.start("run", f"{ws.name}.toml", "--log-file", "first.jsonl")
    wait_until(lambda: seen.exists() and seen.read_text().count("\n") >= 500, timeout=30)
    proc.send_signal(signal.SIGKILL)  # the supervisor; its workers follow through PDEATHSIG
    proc.communicate(timeout=10)
    wait_until(lambda: not processes_titled(f"procd: {ws.name}"), timeout=5)
    first = {int(line) for line in seen.read_text().split()}
    assert 500 <= len(first) < 3000

    second = ws.run("run", f"{ws.name}.toml", timeout=60)
    assert second.code == 0, second.stderr
    (resumed,) = second.output_lines("numbers")
    start = int(resumed.split()[-1])
    assert start >= 500 - 50  # the producer resumed from its checkpoint, not from 0
    ids = [int(line) for line in seen.read_text().split()]
    assert set(ids) == set(range(3000))  # every item, across both runs
    for path in (ws.path / "q1.sqlite", ws.path / "state" / "record.queue.sqlite"):
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM batches").fetchone()[0] == 0  # all acknowledged


def test_a_corrupt_queue_database_is_a_clear_error(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(PIPELINE)
    (ws.path / "q1.sqlite").write_bytes(b"this is not a database " * 100)
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 1
    (error,) = result.events("queue_unavailable")
    assert error["error"] == f"cannot use the SQLite queue {ws.path / 'q1.sqlite'}: file is not a database"
    assert "Traceback" not in result.stderr
    assert not result.events("worker_spawned")


def test_a_locked_queue_database_is_a_clear_error(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(PIPELINE)
    holder = sqlite3.connect(ws.path / "q1.sqlite", isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE IF NOT EXISTS x (y)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = ws.run("run", f"{ws.name}.toml")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.code == 1
    (error,) = result.events("queue_unavailable")
    assert error["error"] == f"cannot use the SQLite queue {ws.path / 'q1.sqlite'}: database is locked"


def test_a_checkpoint_needs_durable_readers(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[defaults]\nrestart = { policy = "no" }\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 10 }\n'
        '[stages.same]\nfunction = "st:same"\ninputs = ["numbers"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 1
    (error,) = result.events("worker_error", stage="numbers")
    assert error["error_type"] == "ValueError"
    assert error["error"].startswith(
        "stage numbers asks for a checkpoint, so every stage reading it needs a durable queue"
    )
