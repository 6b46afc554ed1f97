"""Nothing lost: workers killed at any moment, poison items, dead letters, with real SIGKILLs."""

from __future__ import annotations

import json
import os
import random
import signal
import time

from conftest import Workspace, read_records, wait_until

STAGES = """
import os, signal, time

def numbers(count):
    yield from range(count)

def crash_on(n, poison):
    if n == poison:
        os.kill(os.getpid(), signal.SIGSEGV)
    return n

def busy(n):
    if n % 10 == 0:
        time.sleep(0.001)
    return n

class Check:
    '''Counts every id it gets: missing ones and duplicates.'''
    def __init__(self, count):
        self.seen = bytearray(count)
    def __call__(self, n):
        if self.seen[n] < 255:
            self.seen[n] += 1
    def close(self):
        missing = [i for i, c in enumerate(self.seen) if c == 0]
        duplicates = sum(c - 1 for c in self.seen if c > 1)
        print(json.dumps({"missing": missing[:20], "missing_count": len(missing), "duplicates": duplicates}), flush=True)

import json
"""


def test_a_worker_that_segfaults_on_one_item_dead_letters_it_and_delivers_the_rest(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 2000 }\n'
        '[stages.crashy]\nfunction = "st:crash_on"\ninputs = ["numbers"]\noptions = { poison = 1333 }\n'
        'processes = 2\nmax_attempts = 3\ndead_letter = "dead.jsonl"\nqueue = { maxsize = 100, batch = 25 }\n'
        'restart = { policy = "on-failure", backoff = "0s", max = 10 }\n'
        '[stages.check]\nfunction = "st:Check"\ninputs = ["crashy"]\noptions = { count = 2000 }\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    (summary,) = [json.loads(line) for line in result.output_lines("check")]
    assert summary["missing"] == [1333] and summary["missing_count"] == 1
    crashes = [r for r in result.events("worker_exited", stage="crashy") if r.get("signal") == "SIGSEGV"]
    assert len(crashes) == 3  # the first delivery, then twice with the item in hand
    redelivered = result.events("item_redelivered", stage="crashy")
    assert [r["attempt"] for r in redelivered] == [2, 3, 4]
    (dead,) = result.events("item_dead_lettered", stage="crashy")
    assert dead["error_type"] == "WorkerCrashed" and dead["attempts"] == 3
    (entry,) = [json.loads(line) for line in (ws.path / "dead.jsonl").read_text().splitlines()]
    assert entry["item"] == 1333
    assert entry["error"] == "the worker was killed by SIGSEGV while processing this item"


def test_chaos_sigkill_a_random_worker_every_50ms_loses_nothing(ws: Workspace) -> None:
    count, batch = 100_000, 64
    ws.write("st.py", STAGES)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstop_timeout = "20s"\n'
        f'[stages.numbers]\nfunction = "st:numbers"\noptions = {{ count = {count} }}\n'
        f'[stages.transform]\nfunction = "st:busy"\ninputs = ["numbers"]\nprocesses = 4\n'
        f"queue = {{ maxsize = 1024, batch = {batch} }}\n"
        f'restart = {{ policy = "on-failure", backoff = "0s", max = 10000 }}\n'
        f'[stages.check]\nfunction = "st:Check"\ninputs = ["transform"]\noptions = {{ count = {count} }}\n'
    )
    log = ws.path / "log.jsonl"
    proc = ws.start("run", f"{ws.name}.toml", "--log-file", "log.jsonl")
    kills = 0
    rng = random.Random(4)
    deadline = time.monotonic() + 120
    try:
        wait_until(lambda: any(r["event"] == "pipeline_ready" for r in read_records(log)), timeout=15)
        while proc.poll() is None and time.monotonic() < deadline:
            records = read_records(log)
            live: dict[int, int] = {}
            for r in records:
                if r.get("stage") == "transform" and r["event"] == "worker_spawned":
                    live[r["worker"]] = r["pid"]
                elif (
                    r.get("stage") == "transform"
                    and r["event"] == "worker_exited"
                    and live.get(r["worker"]) == r["pid"]
                ):
                    del live[r["worker"]]
            if live:
                try:
                    os.kill(rng.choice(sorted(live.values())), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    records = read_records(log)
    (summary,) = [json.loads(r["line"]) for r in records if r["event"] == "worker_output" and r["stage"] == "check"]
    redelivered = [r for r in records if r["event"] == "item_redelivered"]
    print(f"chaos: {kills} kills, {len(redelivered)} batches redelivered, {summary['duplicates']} duplicates")
    assert summary["missing_count"] == 0, summary
    assert kills >= 10, f"only {kills} kills: the run was too short to test anything"
    killed = [r for r in records if r["event"] == "worker_exited" and r.get("signal") == "SIGKILL"]
    assert len(killed) >= kills * 0.5
    assert summary["duplicates"] <= kills * batch
    assert redelivered


FRAGILE = """
def numbers():
    yield from range(100)

def fragile(n):
    if n in (25, 75):
        raise ValueError(f"cannot handle {n}")
    return n

def sleepy():
    import time
    while True:
        time.sleep(3600)
        yield None

class Collect:
    def __init__(self):
        self.items = []
    def __call__(self, item):
        self.items.append(item)
    def close(self):
        print("collected", sorted(self.items), flush=True)
"""


def _make_dead_letters(ws: Workspace) -> None:
    ws.write("st.py", FRAGILE)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n'
        '[stages.fragile]\nfunction = "st:fragile"\ninputs = ["numbers"]\ndead_letter = "dead.jsonl"\n'
        '[stages.collect]\nfunction = "st:Collect"\ninputs = ["fragile"]\n'
    )
    assert ws.run("run", f"{ws.name}.toml").code == 0


def test_dlq_list_shows_records_and_skips_other_lines(ws: Workspace) -> None:
    _make_dead_letters(ws)
    with open(ws.path / "dead.jsonl", "a") as fh:
        fh.write("this is not a record\n")
    result = ws.run("dlq", "list", "dead.jsonl")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert "fragile  attempts 3  ValueError: cannot handle 25  item 25" in lines[0]
    assert result.stderr == "2 dead letters; 1 lines are not dead-letter records (skipped)\n"
    as_json = [json.loads(line) for line in ws.run("dlq", "list", "dead.jsonl", "--json").stdout.splitlines()]
    assert [r["item"] for r in as_json] == [25, 75]
    missing = ws.run("dlq", "list", "nope.jsonl")
    assert missing.code == 1 and missing.stderr == "procd dlq list: cannot read nope.jsonl: No such file or directory\n"


def test_replay_a_fixed_item_in_a_fresh_run(ws: Workspace) -> None:
    _make_dead_letters(ws)
    ws.write("st.py", FRAGILE.replace("if n in (25, 75):", "if False:"))  # the fix
    result = ws.run("dlq", "replay", "dead.jsonl", "--into", "fragile", "--pipeline", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [r["stage"] for r in records if r["event"] == "worker_spawned"] == ["collect", "fragile", "dlq-replay"]
    lines = [r["line"] for r in records if r["event"] == "worker_output"]
    assert lines == ["collected [25, 75]"]


def test_replay_into_a_running_pipeline(ws: Workspace) -> None:
    _make_dead_letters(ws)
    ws.pipeline('[stages.idle]\nfunction = "st:sleepy"\n[stages.collect]\nfunction = "st:Collect"\ninputs = ["idle"]\n')
    proc = ws.start_ready()
    try:
        result = ws.run("dlq", "replay", "dead.jsonl", "--into", "collect", "--control", str(ws.control))
        assert result.code == 0, result.stderr
        assert result.stdout == "replayed 2 items into collect\n"
        refused = ws.run("dlq", "replay", "dead.jsonl", "--into", "idle", "--control", str(ws.control))
        assert refused.code == 1 and "no stage 'idle' with an input" in refused.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    records = read_records(ws.path / "log.jsonl")
    assert [r["line"] for r in records if r["event"] == "worker_output"] == ["collected [25, 75]"]
    (replayed,) = [r for r in records if r["event"] == "items_replayed"]
    assert replayed["items"] == 2 and replayed["stage"] == "collect"


def test_an_item_json_cannot_hold_is_kept_by_repr_and_pickle_and_replays_exactly(ws: Workspace) -> None:
    ws.write(
        "st.py",
        """
def sets():
    yield {1, 2}
    yield {3}

def picky(item):
    if 1 in item:
        raise KeyError("no ones")
    return item

class Show:
    def __init__(self):
        self.items = []
    def __call__(self, item):
        self.items.append(sorted(item))
    def close(self):
        print("got", self.items, type(self.items and self.items[0]).__name__, flush=True)
""",
    )
    ws.pipeline(
        '[stages.sets]\nfunction = "st:sets"\n'
        '[stages.picky]\nfunction = "st:picky"\ninputs = ["sets"]\ndead_letter = "dead.jsonl"\nmax_attempts = 1\n'
        '[stages.show]\nfunction = "st:Show"\ninputs = ["picky"]\n'
    )
    assert ws.run("run", f"{ws.name}.toml").code == 0
    (entry,) = [json.loads(line) for line in (ws.path / "dead.jsonl").read_text().splitlines()]
    assert "item" not in entry and entry["item_repr"] == "{1, 2}"
    assert entry["item_unserializable"].startswith("not JSON: Object of type set")
    assert entry["first_failed_at"] and entry["ts"] >= entry["first_failed_at"]
    ws.write("st.py", (ws.path / "st.py").read_text().replace('raise KeyError("no ones")', "pass"))
    replay = ws.run("dlq", "replay", "dead.jsonl", "--into", "picky", "--pipeline", f"{ws.name}.toml")
    assert replay.code == 0, replay.stderr
    lines = [json.loads(line).get("line") for line in replay.stderr.splitlines()]
    assert "got [[1, 2]] list" in lines  # the set itself came back, through its pickle
