"""Nothing lost: workers killed at any moment, poison items, dead letters, with real SIGKILLs."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import Workspace, procd_command, read_records, wait_until

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


def _start_quiet(ws: Workspace, pipeline: str | None = None) -> subprocess.Popen[str]:
    """``procd run`` with its records only in ``log.jsonl``: a kill storm writes more records than
    a pipe holds, and a supervisor blocked writing to a pipe nobody reads would stop the test."""
    proc = subprocess.Popen(
        procd_command("run", pipeline or f"{ws.name}.toml", "--log-file", "log.jsonl", "--control", str(ws.control)),
        cwd=ws.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_until(lambda: any(r["event"] == "pipeline_ready" for r in read_records(ws.path / "log.jsonl")), 15)
    except AssertionError:
        proc.kill()
        proc.communicate()
        raise
    return proc


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
    proc = _start_quiet(ws)
    kills = 0
    rng = random.Random(4)
    deadline = time.monotonic() + 120
    try:
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


# -- the losses of issue 8 and issue 14 (seam): each a run with real SIGKILLs ---------------------

LOSSES = """
import dataclasses, json, os, sys, time

@dataclasses.dataclass
class Item:
    n: int
    blob: bytes = b""

def numbers(count):
    yield from range(count)

def trickle(count, every=10, pause=0.004):
    for n in range(count):
        if n % every == 0:
            time.sleep(pause)
        yield n

def items(count, size=0):
    for n in range(count):
        yield Item(n, b"x" * size)

def slow(item, delay=0.0):
    time.sleep(delay)
    return item

class Check:
    '''Counts the ids it gets (ints, Items or JSON numbers); prints what is missing.'''
    def __init__(self, count, step=1):
        self.seen = bytearray(count)
        self.expect = range(0, count, step)
    def __call__(self, item):
        n = item.n if isinstance(item, Item) else int(item)
        if self.seen[n] < 255:
            self.seen[n] += 1
    def close(self):
        missing = [i for i in self.expect if self.seen[i] == 0]
        duplicates = sum(c - 1 for c in self.seen if c > 1)
        print(json.dumps({"missing": missing[:20], "missing_count": len(missing), "duplicates": duplicates}), flush=True)
"""


def _live(log, stage: str) -> dict[int, int]:
    """worker index -> pid of the live processes of ``stage``, from the records so far."""
    live: dict[int, int] = {}
    for r in read_records(log):
        if r.get("stage") != stage:
            continue
        if r["event"] == "worker_spawned":
            live[r["worker"]] = r["pid"]
        elif r["event"] == "worker_exited" and live.get(r["worker"]) == r["pid"]:
            del live[r["worker"]]
    return live


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _summary(records: list[dict], stage: str = "check") -> dict:
    (summary,) = [json.loads(r["line"]) for r in records if r["event"] == "worker_output" and r["stage"] == stage]
    return summary


def _kill_storm(proc, log, stage: str, *, every_s: float, for_s: float, programs: bool = False) -> int:
    """SIGKILL a random live worker of ``stage`` (or its program) every ``every_s`` for ``for_s``."""
    rng = random.Random(8)
    kills = 0
    end = time.monotonic() + for_s
    while proc.poll() is None and time.monotonic() < end:
        live = sorted(_live(log, stage).values())
        targets = [c for p in live for c in _children(p)] if programs else live
        if targets:
            try:
                os.kill(rng.choice(targets), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(every_s)
    return kills


def _finish(proc, timeout: float = 60) -> None:
    try:
        proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_items_of_a_stage_class_killed_after_the_producer_ended_are_all_delivered(ws: Workspace) -> None:
    """Issue 8, loss 1: the supervisor must not need the stage's class to know a slot holds a batch
    (the stage code lives next to the pipeline file, not where procd runs)."""
    count = 4000
    ws.write("pipe/st.py", LOSSES)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstop_timeout = "20s"\n'
        f'[stages.items]\nfunction = "st:items"\noptions = {{ count = {count} }}\n'
        '[stages.transform]\nfunction = "st:slow"\ninputs = ["items"]\nprocesses = 2\noptions = { delay = 0.001 }\n'
        'queue = { maxsize = 4000, batch = 50 }\nrestart = { policy = "always", backoff = "0s", max = 100 }\n'
        f'[stages.check]\nfunction = "st:Check"\ninputs = ["transform"]\noptions = {{ count = {count} }}\n',
        stem=f"pipe/{ws.name}",
    )
    log = ws.path / "log.jsonl"
    proc = _start_quiet(ws, f"pipe/{ws.name}.toml")
    try:
        wait_until(lambda: any(r["event"] == "stage_drained" and r["stage"] == "items" for r in read_records(log)), 20)
        kills = 0
        for _ in range(3):
            live = _live(log, "transform")
            if proc.poll() is not None or not live:
                break
            pid = sorted(live.values())[0]
            os.kill(pid, signal.SIGKILL)
            kills += 1
            wait_until(lambda pid=pid: pid not in _live(log, "transform").values(), 10)
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = read_records(log)
    assert kills >= 2
    assert _summary(records)["missing_count"] == 0, _summary(records)
    assert proc.returncode == 0
    assert [r for r in records if r["event"] == "item_redelivered"]


GATED = """
import os, time

def gated(count, gate):
    yield 0
    while not os.path.exists(gate):
        time.sleep(0.01)
    yield from range(1, count)

def show(n):
    if n == 0:
        print("got 0", flush=True)
    return n
"""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def test_a_worker_killed_between_batches_after_its_input_ended_is_restarted(ws: Workspace) -> None:
    """Issue 8, loss 4: killed holding nothing while its queue still holds items, after the end of
    its input, it is restarted by its policy and the queued items are delivered."""
    count = 600
    ws.write("st.py", LOSSES + GATED)
    ws.pipeline(
        f'[stages.numbers]\nfunction = "st:gated"\noptions = {{ count = {count}, gate = "go" }}\n'
        '[stages.transform]\nfunction = "st:show"\ninputs = ["numbers"]\n'
        'queue = { maxsize = 1000, batch = 1 }\nrestart = { policy = "always", backoff = "0s" }\n'
        f'[stages.check]\nfunction = "st:Check"\ninputs = ["transform"]\noptions = {{ count = {count} }}\n'
    )
    log = ws.path / "log.jsonl"
    proc = _start_quiet(ws)
    try:
        wait_until(lambda: any(r.get("line") == "got 0" for r in read_records(log)), 20)
        pid = _live(log, "transform")[0]
        wait_until(lambda: _state(pid) == "S", 10)  # waiting for its next batch: it holds none
        os.kill(pid, signal.SIGSTOP)
        (ws.path / "go").touch()
        wait_until(
            lambda: any(r["event"] == "stage_drained" and r["stage"] == "numbers" for r in read_records(log)), 20
        )
        os.kill(pid, signal.SIGKILL)
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = read_records(log)
    assert proc.returncode == 0
    assert _summary(records)["missing_count"] == 0
    assert len([r for r in records if r["event"] == "worker_spawned" and r["stage"] == "transform"]) == 2


def test_replay_into_a_running_pipeline_with_a_durable_input(ws: Workspace) -> None:
    """Issue 8, loss 2: the replayed items reach a stage whose input is a SQLite queue."""
    _make_dead_letters(ws)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstate_dir = "state"\n'
        '[stages.idle]\nfunction = "st:sleepy"\n'
        '[stages.collect]\nfunction = "st:Collect"\ninputs = ["idle"]\nqueue = { backend = "sqlite" }\n'
    )
    proc = _start_quiet(ws)
    try:
        result = ws.run("dlq", "replay", "dead.jsonl", "--into", "collect", "--control", str(ws.control))
        assert result.code == 0, result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    records = read_records(ws.path / "log.jsonl")
    assert [r["line"] for r in records if r["event"] == "worker_output"] == ["collected [25, 75]"]


ECHO = """
import sys, time
for line in sys.stdin:
    time.sleep(0.0005)
    sys.stdout.write(line)
    sys.stdout.flush()
"""


def _command_storm(ws: Workspace, command: str, count: int, expect: str | None, kills: int = 5) -> list[dict]:
    ws.write("st.py", LOSSES)
    ws.write("echo.py", ECHO)
    check_options = f"count = {count}" + (f", step = {expect}" if expect else "")
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstop_timeout = "20s"\n'
        f'[stages.numbers]\nfunction = "st:trickle"\noptions = {{ count = {count} }}\n'
        f'[stages.cmd]\ncommand = {command}\ninputs = ["numbers"]\nprocesses = 2\n'
        'queue = { maxsize = 200, batch = 20 }\nrestart = { policy = "on-failure", backoff = "0s", max = 100 }\n'
        f'[stages.check]\nfunction = "st:Check"\ninputs = ["cmd"]\noptions = {{ {check_options} }}\n'
    )
    log = ws.path / "log.jsonl"
    proc = _start_quiet(ws)
    done = 0
    try:
        while done < kills and proc.poll() is None:
            programs = [c for p in _live(log, "cmd").values() for c in _children(p)]
            if programs:
                try:
                    os.kill(programs[done % len(programs)], signal.SIGKILL)
                    done += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = read_records(log)
    assert done >= 3, f"only {done} kills"
    assert proc.returncode == 0, [r for r in records if r["event"] in ("worker_exited", "pipeline_stopped")][-5:]
    summary = _summary(records)
    assert summary["missing_count"] == 0, summary
    return records


def test_a_command_stage_killed_five_times_delivers_every_line_python(ws: Workspace) -> None:
    """Issue 8, loss 3: the lines a killed program held go to the slot's next program."""
    import sys

    records = _command_storm(ws, f'["{sys.executable}", "-u", "echo.py"]', 5000, None)
    assert [r for r in records if r["event"] == "item_redelivered" and r["stage"] == "cmd"]


def test_a_command_stage_killed_five_times_delivers_every_line_grep(ws: Workspace) -> None:
    """A filter (fewer lines out than in): every even number arrives."""
    _command_storm(ws, '["grep", "--line-buffered", "[02468]$"]', 5000, "2")


def test_a_command_stage_killed_five_times_delivers_every_line_awk(ws: Workspace) -> None:
    """mawk reads its input ahead (a whole buffer before it handles a line) unless told not to:
    ``-W interactive``, as the README says."""
    _command_storm(ws, '["awk", "-W", "interactive", "{ print $1; fflush() }"]', 5000, None)


def _storm_of_kills(ws: Workspace, min_kills: int) -> None:
    """Run the workspace's pipeline, SIGKILL a ``middle`` worker every 20 ms for 4 s: every item
    must reach the sink and the run exit 0."""
    log = ws.path / "log.jsonl"
    proc = _start_quiet(ws)
    try:
        kills = _kill_storm(proc, log, "middle", every_s=0.02, for_s=4)
    finally:
        _finish(proc, timeout=40)
    records = read_records(log)
    assert kills >= min_kills, kills
    assert proc.returncode == 0
    assert [r for r in records if r["event"] == "item_redelivered"]
    assert _summary(records)["missing_count"] == 0, _summary(records)


def test_a_kill_storm_with_large_batches_and_small_bounds_delivers_everything(ws: Workspace) -> None:
    """Issue 14, items 1 and 2: batches over the inline limit, a bound no dead process can hold.
    (``max_attempts`` is high: an item in hand at three random kills would be dead-lettered.)"""
    count = 300
    ws.write("st.py", LOSSES)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstop_timeout = "20s"\nstate_dir = "state"\n'
        f'[stages.items]\nfunction = "st:items"\noptions = {{ count = {count}, size = 700_000 }}\n'
        '[stages.middle]\nfunction = "st:slow"\ninputs = ["items"]\nprocesses = 3\nmax_attempts = 1000\n'
        "options = { delay = 0.03 }\n"
        'queue = { maxsize = 4, batch = 1 }\nrestart = { policy = "always", backoff = "0s", max = 100000 }\n'
        f'[stages.check]\nfunction = "st:Check"\ninputs = ["middle"]\noptions = {{ count = {count} }}\n'
        "queue = { maxsize = 2, batch = 1 }\n"
    )
    _storm_of_kills(ws, min_kills=100)


def test_a_kill_storm_on_a_durable_queue_delivers_everything_in_one_run(ws: Workspace) -> None:
    """Issue 14, item 3: a doorbell taken by a dying reader is delivered within the run."""
    count = 6000
    ws.write("st.py", LOSSES)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstop_timeout = "20s"\nstate_dir = "state"\n'
        f'[stages.numbers]\nfunction = "st:numbers"\noptions = {{ count = {count} }}\n'
        '[stages.middle]\nfunction = "st:slow"\ninputs = ["numbers"]\nprocesses = 3\nmax_attempts = 1000\n'
        "options = { delay = 0.001 }\n"
        'queue = { backend = "sqlite", maxsize = 160, batch = 16 }\n'
        'restart = { policy = "always", backoff = "0s", max = 100000 }\n'
        f'[stages.check]\nfunction = "st:Check"\ninputs = ["middle"]\noptions = {{ count = {count} }}\n'
    )
    _storm_of_kills(ws, min_kills=50)


def test_running_out_of_descriptors_is_a_spawn_failure_not_a_crash(ws: Workspace) -> None:
    """Issue 14, item 14: EMFILE while making a worker's slot file fails that spawn, no traceback."""
    import resource

    ws.write("st.py", LOSSES)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 100 }\n'
        '[stages.wide]\nfunction = "st:slow"\ninputs = ["numbers"]\nprocesses = 30\n'
        'restart = { policy = "on-failure", backoff = "0s", max = 3 }\n'
        '[stages.check]\nfunction = "st:Check"\ninputs = ["wide"]\noptions = { count = 100 }\n'
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.run(
        [sys.executable, "-m", "procd", "run", f"{ws.name}.toml", "--control", str(ws.control)],
        cwd=ws.path,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    failed = [r for r in records if r["event"] == "spawn_failed"]
    assert failed and all(r["errno"] == errno.EMFILE for r in failed)
    assert proc.returncode == 1
    assert records[-1]["event"] == "pipeline_stopped"


LINGERING = """
import os, subprocess, time

def numbers_then_exec(count):
    subprocess.Popen(["sleep", "30"], close_fds=False)  # a program that outlives the stage
    yield from range(count)

def numbers_then_fork(count, marker):
    if os.fork() == 0:  # a forked child (no exec) holds every descriptor of the worker
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(30)
        os._exit(0)
    yield from range(count)
"""


def test_a_program_started_by_stage_code_does_not_hold_a_queue_open(ws: Workspace) -> None:
    """Issue 14, item 15: queue descriptors are close-on-exec in the worker (spawn made them
    inheritable to cross its own exec)."""
    ws.write("st.py", LOSSES + LINGERING)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstart_method = "spawn"\nstop_timeout = "5s"\n'
        '[stages.numbers]\nfunction = "st:numbers_then_exec"\noptions = { count = 100 }\n'
        '[stages.check]\nfunction = "st:Check"\ninputs = ["numbers"]\noptions = { count = 100 }\n'
    )
    result = ws.run("run", f"{ws.name}.toml", timeout=25)
    assert result.code == 0, result.stderr[-2000:]
    assert json.loads(result.output_lines("check")[0])["missing_count"] == 0


def test_a_forked_child_holding_an_input_open_is_named(ws: Workspace) -> None:
    """A forked child cannot be kept from inheriting; procd names it when the input it holds
    cannot end, and the run ends once it exits."""
    ws.write("st.py", LOSSES + LINGERING)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "5s"\n'
        '[stages.numbers]\nfunction = "st:numbers_then_fork"\noptions = { count = 100, marker = "child.pid" }\n'
        '[stages.check]\nfunction = "st:Check"\ninputs = ["numbers"]\noptions = { count = 100 }\n'
    )
    log = ws.path / "log.jsonl"
    proc = _start_quiet(ws)
    try:
        (held,) = wait_until(lambda: [r for r in read_records(log) if r["event"] == "input_held_open"], 15)
        child = int((ws.path / "child.pid").read_text())
        assert held["stage"] == "check" and held["holders"] == [child]
        os.kill(child, signal.SIGKILL)
        _finish(proc, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


QUITTER = """
import os, time

def quits_once(n, marker):
    if n == 0:
        time.sleep(0.5)  # the producer has ended by the time it goes on
    if n == 55 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(0)  # a clean exit in the middle of a batch
    return n
"""


def test_a_worker_that_exits_0_holding_a_batch_is_restarted_and_its_batch_delivered(ws: Workspace) -> None:
    """Exit 0 must mean nothing was lost: a process that ends cleanly with a batch still held has
    failed (restarted by its policy, like a crash), and its batch goes to the slot's next process."""
    ws.write("st.py", LOSSES + QUITTER)
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 100 }\n'
        '[stages.quitter]\nfunction = "st:quits_once"\ninputs = ["numbers"]\noptions = { marker = "quit" }\n'
        'queue = { maxsize = 100, batch = 10 }\nrestart = { policy = "on-failure", backoff = "0s" }\n'
        '[stages.check]\nfunction = "st:Check"\ninputs = ["quitter"]\noptions = { count = 100 }\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    (exited,) = [r for r in result.events("worker_exited", stage="quitter") if r.get("code") == 0 and not r["expected"]]
    assert exited["cause"] == "exited holding a batch it had not handed on"
    (redelivered,) = result.events("item_redelivered", stage="quitter")
    assert redelivered["items"] == 10
    summary = json.loads(result.output_lines("check")[0])
    assert summary["missing_count"] == 0
    assert result.code == 0, result.stderr[-2000:]


POISON_PROGRAM = """
import os, signal, sys
for line in sys.stdin:
    if line.strip() == "13":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdout.write(line)
    sys.stdout.flush()
"""


def test_a_line_that_kills_a_command_stage_program_is_dead_lettered(ws: Workspace) -> None:
    """The same attempt counting as function stages: the held batch goes to the next program one
    line at a time, and the line that kills ``max_attempts`` programs is set aside."""
    ws.write("st.py", LOSSES)
    ws.write("poison.py", POISON_PROGRAM)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nstate_dir = "state"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 100 }\n'
        f'[stages.cmd]\ncommand = ["{sys.executable}", "poison.py"]\ninputs = ["numbers"]\nmax_attempts = 3\n'
        'dead_letter = "dead.jsonl"\nqueue = { maxsize = 100, batch = 10 }\n'
        'restart = { policy = "on-failure", backoff = "0s", max = 10 }\n'
        '[stages.check]\nfunction = "st:Check"\ninputs = ["cmd"]\noptions = { count = 100 }\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr[-2000:]
    summary = json.loads(result.output_lines("check")[0])
    assert summary["missing"] == [13] and summary["missing_count"] == 1
    (dead,) = result.events("item_dead_lettered", stage="cmd")
    assert dead["error_type"] == "WorkerCrashed" and dead["attempts"] == 3
    (entry,) = [json.loads(line) for line in (ws.path / "dead.jsonl").read_text().splitlines()]
    assert entry["item"] == 13


UNREAD_PROGRAM = """
import fcntl, os, struct, sys, termios, time

def waiting_input():
    count = bytearray(4)
    fcntl.ioctl(0, termios.FIONREAD, count)
    return struct.unpack("i", count)[0] > 0

# Say so once a line waits on stdin, and read nothing until the test says go.
while not waiting_input():
    time.sleep(0.002)
open(f"waiting.{os.getpid()}", "w").close()
while not os.path.exists("go"):
    time.sleep(0.002)
for line in sys.stdin:
    sys.stdout.write(line)
    sys.stdout.flush()
"""


def test_a_program_killed_before_it_read_the_line_in_hand_is_not_charged_with_it(ws: Workspace) -> None:
    """Careful mode charges the line in hand with a crash only if the program read it: programs
    killed while the line still waits in their stdin pipe (starting up, under load) never saw it,
    and three such kills must not dead-letter it (a line missing from the sink in the kill storm
    of ``test_a_command_stage_killed_five_times_delivers_every_line_python`` under load)."""
    count = 10
    ws.write("st.py", LOSSES)
    ws.write("unread.py", UNREAD_PROGRAM)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\n'
        f'[stages.numbers]\nfunction = "st:numbers"\noptions = {{ count = {count} }}\n'
        f'[stages.cmd]\ncommand = ["{sys.executable}", "unread.py"]\ninputs = ["numbers"]\nmax_attempts = 3\n'
        'dead_letter = "dead.jsonl"\nqueue = { maxsize = 100, batch = 10 }\n'
        'restart = { policy = "on-failure", backoff = "0s", max = 10 }\n'
        f'[stages.check]\nfunction = "st:Check"\ninputs = ["cmd"]\noptions = {{ count = {count} }}\n'
    )
    log = ws.path / "log.jsonl"
    proc = _start_quiet(ws)
    killed: set[str] = set()
    try:
        # the first program gets the batch, the next two its first line alone (careful mode)
        for _ in range(3):

            def new_waiting() -> list[str]:
                return [p.name for p in ws.path.glob("waiting.*") if p.name not in killed]

            (name,) = wait_until(new_waiting, 20)
            os.kill(int(name.split(".")[1]), signal.SIGKILL)
            killed.add(name)
        wait_until(
            lambda: len([r for r in read_records(log) if r["event"] == "worker_spawned" and r["stage"] == "cmd"]) == 4,
            20,
        )
        (ws.path / "go").touch()
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = read_records(log)
    assert proc.returncode == 0
    assert [r for r in records if r["event"] == "item_dead_lettered"] == []
    assert _summary(records)["missing_count"] == 0, _summary(records)
