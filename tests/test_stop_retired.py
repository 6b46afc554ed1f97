"""The exit code counts what retired workers and retired inputs still held: a worker scaled away
or replaced by a reload leaves the pipeline when its process ends, and an input a reload replaced
is closed once drained; what either held at the end was neither delivered nor dead-lettered, and
exit 0 must not say it was."""

from __future__ import annotations

import json
import os
import signal

from conftest import Started, Workspace, read_records, reaped, wait_until

STAGES = """
import os, time

def numbers(count):
    yield from range(count)

def gated(n):  # holds its batch until the test opens the gate
    while not os.path.exists("gate"):
        time.sleep(0.01)
    with open("delivered", "a") as fh:
        fh.write(f"{n}\\n")

def second_crashes(n):  # worker 1 dies on every batch it takes; the others wait for the gate
    with open("/proc/self/cmdline") as fh:
        if "[1]" in fh.read():
            os._exit(1)
    gated(n)

def second_stuck(n):  # worker 1 holds its batch for good (its title ends in [1]); the others wait for the gate
    with open("/proc/self/cmdline") as fh:
        stuck = "[1]" in fh.read()
    while stuck or not os.path.exists("gate"):
        time.sleep(0.01)
"""

PRODUCER_AT_GATE = """
def deliver(n):
    with open("delivered", "a") as fh:
        fh.write(f"{n}\\n")

def numbers_then_gate(count):  # its items, then it waits for the gate: its readers' input stays open
    yield from range(count)
    while not os.path.exists("gate"):
        time.sleep(0.01)
"""


def _ask(ws: Workspace, *args: str):
    return ws.run(*args, "--control", str(ws.control))


def _workers(ws: Workspace, stage: str) -> list[dict]:
    reply = json.loads(_ask(ws, "status", "--json").stdout)
    (found,) = [s for s in reply["stages"] if s["name"] == stage]
    return found["workers"]


def _delivered(ws: Workspace) -> list[int]:
    path = ws.path / "delivered"
    return sorted(int(line) for line in path.read_text().split()) if path.exists() else []


def test_a_scaled_away_worker_killed_holding_a_batch_makes_the_exit_code_1(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 20 }\n'
        '[stages.work]\nfunction = "st:gated"\ninputs = ["numbers"]\nprocesses = 2\nqueue = { batch = 4 }\n'
    )
    with reaped(ws.start_ready()) as proc:
        # both workers hold a batch of 4, blocked at the gate
        wait_until(lambda: all(w["items_in"] == 4 for w in _workers(ws, "work")) or None)
        scaled = _ask(ws, "scale", ws.name, "work=1")
        assert (scaled.code, scaled.stdout) == (0, "work: 1 processes (started [], retiring [1])\n")
        (retiring,) = [w for w in _workers(ws, "work") if w["index"] == 1]
        os.kill(retiring["pid"], signal.SIGKILL)  # it finishes its batch no more: 4 items lost
        log = ws.path / "log.jsonl"
        (abandoned,) = wait_until(lambda: [r for r in read_records(log) if r["event"] == "batch_abandoned"])
        assert (abandoned["stage"], abandoned["worker"], abandoned["items"]) == ("work", 1, 4)
        (ws.path / "gate").touch()
        proc.communicate(timeout=30)  # the producer is finite: the pipeline ends by itself
    assert len(_delivered(ws)) == 16
    records = read_records(ws.path / "log.jsonl")
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert proc.returncode == 1
    assert (stopped["exit_code"], stopped["outcome"]) == (1, "failed")
    assert stopped["abandoned"]["in_hand_items"] == 4
    (stage,) = [r for r in records if r["event"] == "stage_abandoned"]
    assert (stage["stage"], stage["in_hand_items"]) == ("work", 4)


def test_a_scaled_away_worker_killed_at_the_stop_deadline_counts_as_forced(ws: Workspace) -> None:
    # redeliver = false: its batch is not tracked, so only the kill can make the exit code 1
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "1h"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 20 }\n'
        '[stages.work]\nfunction = "st:second_stuck"\ninputs = ["numbers"]\nprocesses = 2\n'
        "queue = { batch = 4 }\nredeliver = false\n"
    )
    log = ws.path / "log.jsonl"
    with reaped(ws.start_ready()) as proc:
        wait_until(lambda: all(w["items_in"] == 4 for w in _workers(ws, "work")) or None)
        scaled = _ask(ws, "scale", ws.name, "work=1")
        assert (scaled.code, scaled.stdout) == (0, "work: 1 processes (started [], retiring [1])\n")
        (ws.path / "gate").touch()  # work[0] reads the rest and ends with its input; work[1] never ends
        wait_until(lambda: [r for r in read_records(log) if r["event"] == "worker_exited" and r["stage"] == "work"])
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: [r for r in read_records(log) if r["event"] == "stop_requested"])
        proc.send_signal(signal.SIGTERM)  # a second request kills what still runs: the retiring work[1]
        proc.communicate(timeout=30)
    records = read_records(log)
    (killed,) = [r for r in records if r["event"] == "worker_exited" and (r["stage"], r["worker"]) == ("work", 1)]
    assert killed["signal"] == "SIGKILL"
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["exit_code"], stopped["outcome"]) == (1, 1, "failed")
    assert stopped["forced"] == ["work[1]"]
    assert stopped["forced_by"] == "a second stop request (SIGTERM)"


def test_a_replaced_input_let_go_with_batches_in_it_makes_the_exit_code_1(ws: Workspace) -> None:
    pipeline = (
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 20 }\n'
        '[stages.work]\nfunction = "st:gated"\ninputs = ["numbers"]\nqueue = { batch = %d }\n'
    )
    ws.write("st.py", STAGES)
    ws.pipeline(pipeline % 4)
    log = ws.path / "log.jsonl"
    with reaped(ws.start_ready()) as proc:
        # the producer has finished: 4 items in work[0]'s hand, 16 in its queue
        wait_until(lambda: [r for r in read_records(log) if r["event"] == "stage_drained"])
        (old,) = wait_until(lambda: [w for w in _workers(ws, "work") if w["items_in"] == 4])
        ws.pipeline(pipeline % 2)  # a new queue: the old one is retired, its reader reads it to its end
        reloaded = _ask(ws, "reload")
        assert reloaded.code == 0, reloaded.stderr
        os.kill(old["pid"], signal.SIGKILL)  # nobody will read the old queue now
        wait_until(lambda: [r for r in read_records(log) if r["event"] == "batch_abandoned"])
        (ws.path / "gate").touch()
        proc.communicate(timeout=30)  # nothing runs any more: the pipeline ends by itself
    assert _delivered(ws) == []
    records = read_records(log)
    (stage,) = [r for r in records if r["event"] == "stage_abandoned"]
    assert (stage["stage"], stage["in_hand_items"]) == ("work", 4)
    assert stage["queued_batches"] >= 4 and stage["queued_items_at_most"] >= 16  # 16 items, at most 4 a batch
    (let_go,) = [r for r in records if r["event"] == "input_abandoned"]  # said when the old queue was closed
    assert (let_go["stage"], let_go["queued_batches"]) == ("work", stage["queued_batches"])
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert stopped["abandoned"]["queued_batches"] == stage["queued_batches"]
    assert (proc.returncode, stopped["exit_code"], stopped["outcome"]) == (1, 1, "failed")


def test_a_batch_kept_for_a_restart_that_a_scale_down_cancels_is_said_abandoned(ws: Workspace) -> None:
    # work[1] crashes holding its batch and waits an hour to start again: scaled away meanwhile,
    # its slot leaves with that batch, which no process will deliver
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 20 }\n'
        '[stages.work]\nfunction = "st:second_crashes"\ninputs = ["numbers"]\nprocesses = 2\nqueue = { batch = 4 }\n'
        'restart = { policy = "on-failure", backoff = "1h" }\n'
    )
    log = ws.path / "log.jsonl"
    with reaped(ws.start("run", f"{ws.name}.toml", "--log-file", "log.jsonl")) as proc:
        (kept,) = wait_until(lambda: [r for r in read_records(log) if r["event"] == "item_redelivered"])
        assert (kept["worker"], kept["items"]) == (1, 4)
        scaled = _ask(ws, "scale", ws.name, "work=1")
        assert (scaled.code, scaled.stdout) == (0, "work: 1 processes (started [], retiring [1])\n")
        (ws.path / "gate").touch()
        proc.communicate(timeout=30)
    assert len(_delivered(ws)) == 16
    records = read_records(log)
    (abandoned,) = [r for r in records if r["event"] == "batch_abandoned"]
    assert (abandoned["worker"], abandoned["items"]) == (1, 4)
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["outcome"], stopped["abandoned"]["in_hand_items"]) == (1, "failed", 4)


def test_a_scaled_away_worker_killed_at_its_retire_deadline_with_an_untracked_batch_fails(ws: Workspace) -> None:
    # no stop: the retire's own deadline (stop_timeout after the scale) kills work[1], and with
    # redeliver = false the batch it held is tracked nowhere (it exited 0, 4 items lost)
    ws.write("st.py", STAGES + PRODUCER_AT_GATE)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "1s"\n'
        '[stages.numbers]\nfunction = "st:numbers_then_gate"\noptions = { count = 20 }\n'
        '[stages.work]\nfunction = "st:second_stuck"\ninputs = ["numbers"]\nprocesses = 2\n'
        "queue = { batch = 4 }\nredeliver = false\n"
    )
    log = ws.path / "log.jsonl"
    with reaped(ws.start_ready()) as proc:
        wait_until(lambda: all(w["items_in"] >= 4 for w in _workers(ws, "work")) or None)
        scaled = _ask(ws, "scale", ws.name, "work=1")
        assert (scaled.code, scaled.stdout) == (0, "work: 1 processes (started [], retiring [1])\n")
        (killed,) = wait_until(
            lambda: [r for r in read_records(log) if r["event"] == "worker_exited" and r["worker"] == 1]
        )
        assert killed["signal"] == "SIGKILL"
        assert killed["cause"] == "killed by SIGKILL after the retire timeout (1s)"  # no stop was asked for
        (ws.path / "gate").touch()
        proc.communicate(timeout=30)  # the producer is finite: the pipeline ends by itself
    records = read_records(log)
    (escalated,) = [r for r in records if r["event"] == "stop_escalated"]
    assert (escalated["worker"], escalated["forced_by"]) == (1, "retire_timeout")
    (abandoned,) = [r for r in records if r["event"] == "batch_abandoned"]
    assert (abandoned["worker"], abandoned["items"]) == (1, None)  # not tracked: how many is not known
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["exit_code"], stopped["outcome"]) == (1, 1, "failed")
    assert stopped["forced"] == []  # no stop was forced: the kill lost a batch
    assert any("work[1]" in failure and "redeliver = false" in failure for failure in stopped["failures"])


DRAIN = """
[pipeline]
name = "{name}"
stop_timeout = "%s"
[stages.numbers]
function = "st:numbers"
options = { count = 60 }
[stages.work]
function = "st:%s"
inputs = ["numbers"]
queue = { batch = %d }
[stages.sink]
function = "st:sink"
inputs = ["work"]
"""

DRAIN_STAGES = """
import os, time

def numbers(count):
    yield from range(count)

def slow(n):  # 60 items take 3 s, far longer than the stop timeout
    time.sleep(0.05)
    return n

def gated(n):  # holds its first item until the gate opens
    while not os.path.exists("gate"):
        time.sleep(0.01)
    return n

def sink(n):
    with open("delivered", "a") as fh:
        fh.write(f"{n}\\n")
"""


def _replace_the_queue_of_work(ws: Workspace, stop_timeout: str, function: str) -> Started:
    """Start the pipeline; once numbers has finished (its 60 items queued for work), reload with
    work's queue.batch changed: the old queue is retired and its reader reads it to its end."""
    ws.write("st.py", DRAIN_STAGES)
    ws.pipeline(DRAIN % (stop_timeout, function, 4))
    log = ws.path / "log.jsonl"
    proc = ws.start_ready()
    wait_until(lambda: [r for r in read_records(log) if r["event"] == "stage_drained" and r["stage"] == "numbers"])
    ws.pipeline(DRAIN % (stop_timeout, function, 2))
    reloaded = _ask(ws, "reload")
    assert (reloaded.code, reloaded.stdout) == (0, "changed work\n"), reloaded.stderr
    return proc


def test_a_reader_draining_a_replaced_queue_is_not_killed_at_the_stop_timeout(ws: Workspace) -> None:
    # the old work[0] reads its old queue to the end, which takes longer than stop_timeout: no stop
    # was asked for, so nothing may kill it (it was killed, 40-odd items lost, exit 1)
    with reaped(_replace_the_queue_of_work(ws, "300ms", "slow")) as proc:
        proc.communicate(timeout=60)
    records = read_records(ws.path / "log.jsonl")
    assert not [r for r in records if r["event"] in ("stop_escalated", "batch_abandoned", "input_abandoned")]
    assert _delivered(ws) == list(range(60))
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["outcome"]) == (0, "finished")


def test_a_stop_still_kills_a_reader_draining_a_replaced_queue_at_its_deadline(ws: Workspace) -> None:
    log = ws.path / "log.jsonl"
    with reaped(_replace_the_queue_of_work(ws, "300ms", "gated")) as proc:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)  # a hang here: the draining reader had no stop deadline
    records = read_records(log)
    escalated = {r["stage"]: r["forced_by"] for r in records if r["event"] == "stop_escalated"}
    assert escalated == {"work": "stop_timeout", "sink": "stop_timeout"}  # sink[0] waits for work's end
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["outcome"], sorted(stopped["forced"])) == (1, "failed", ["sink[0]", "work[0]"])


def test_a_scaled_away_worker_killed_holding_an_untracked_batch_makes_the_exit_code_1(ws: Workspace) -> None:
    # redeliver = false: the slot file does not keep the batch, but it says one was received and
    # not yet followed by another receive; a kill then loses it (it exited 0)
    ws.write("st.py", STAGES)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 20 }\n'
        '[stages.work]\nfunction = "st:gated"\ninputs = ["numbers"]\nprocesses = 2\nqueue = { batch = 4 }\n'
        "redeliver = false\n"
    )
    log = ws.path / "log.jsonl"
    with reaped(ws.start_ready()) as proc:
        wait_until(lambda: all(w["items_in"] == 4 for w in _workers(ws, "work")) or None)
        scaled = _ask(ws, "scale", ws.name, "work=1")
        assert (scaled.code, scaled.stdout) == (0, "work: 1 processes (started [], retiring [1])\n")
        (retiring,) = [w for w in _workers(ws, "work") if w["index"] == 1]
        os.kill(retiring["pid"], signal.SIGKILL)
        (abandoned,) = wait_until(lambda: [r for r in read_records(log) if r["event"] == "batch_abandoned"])
        assert (abandoned["stage"], abandoned["worker"], abandoned["items"]) == ("work", 1, None)  # not counted
        (ws.path / "gate").touch()
        proc.communicate(timeout=30)
    assert len(_delivered(ws)) == 16
    (stopped,) = [r for r in read_records(log) if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["exit_code"], stopped["outcome"]) == (1, 1, "failed")
    assert any("work[1]" in failure and "redeliver = false" in failure for failure in stopped["failures"])


def test_an_idle_worker_killed_with_redeliver_false_loses_nothing_and_the_exit_code_is_0(ws: Workspace) -> None:
    # both work workers have handed on what they took and wait for input: a kill loses nothing
    ws.write("st.py", STAGES + PRODUCER_AT_GATE)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers_then_gate"\noptions = { count = 8 }\n'
        '[stages.work]\nfunction = "st:deliver"\ninputs = ["numbers"]\nprocesses = 2\nqueue = { batch = 4 }\n'
        "redeliver = false\n"
    )
    log = ws.path / "log.jsonl"
    with reaped(ws.start_ready()) as proc:
        wait_until(lambda: len(_delivered(ws)) == 8 or None)
        (idle,) = wait_until(lambda: [w for w in _workers(ws, "work") if w["index"] == 1 and w["state"] == "blocked"])
        os.kill(idle["pid"], signal.SIGKILL)
        wait_until(lambda: [r for r in read_records(log) if r["event"] == "worker_exited" and r["stage"] == "work"])
        (ws.path / "gate").touch()
        proc.communicate(timeout=30)
    assert _delivered(ws) == list(range(8))
    records = read_records(log)
    assert not [r for r in records if r["event"] == "batch_abandoned"]
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["outcome"]) == (0, "finished")


def test_workers_a_reload_replaces_are_not_counted_as_restarts(ws: Workspace) -> None:
    # two reloads replace work's three workers twice; then one worker crashes once. The
    # replacements were counted as restarts (6, more than restart.max = 5), so that one crash made
    # the stage fatal and the run exit 1 with nothing lost
    pipeline = (
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers_then_gate"\noptions = { count = 8 }\n'
        '[stages.work]\nfunction = "st:deliver"\ninputs = ["numbers"]\nprocesses = 3\nqueue = { batch = 1 }\n'
        'restart = { policy = "on-failure", max = 5, within = "1h", backoff = "0s" }\n'
        "# reload %d\n"
    )
    ws.write("st.py", STAGES + PRODUCER_AT_GATE.replace("def deliver(n):", "def deliver(n, label=0):"))
    ws.pipeline(pipeline % 0)
    log = ws.path / "log.jsonl"
    with reaped(ws.start_ready()) as proc:
        wait_until(lambda: len(_delivered(ws)) == 8 or None)
        for label in (1, 2):
            ws.pipeline((pipeline % label).replace('"st:deliver"', f'"st:deliver"\noptions = {{ label = {label} }}'))
            reloaded = _ask(ws, "reload")
            assert (reloaded.code, reloaded.stdout) == (0, "changed work\n"), reloaded.stderr
            wait_until(lambda: len([w for w in _workers(ws, "work") if w["state"] == "blocked"]) == 3 or None)
        (victim, *_) = _workers(ws, "work")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: [r for r in read_records(log) if r["event"] == "worker_backoff"])
        (ws.path / "gate").touch()
        proc.communicate(timeout=30)
    records = read_records(log)
    assert not [r for r in records if r["event"] == "stage_fatal"]
    (stopped,) = [r for r in records if r["event"] == "pipeline_stopped"]
    assert (proc.returncode, stopped["outcome"]) == (0, "finished")


BUSY_STAGES = """
import time
def numbers(count):
    yield from range(count)
def work(n):
    time.sleep(0.005)
    return n
def sink(n):
    with open("delivered", "a") as fh:
        fh.write(f"{n}\\n")

class SlowClose:  # leaves slowly: its close outlasts the stop timeout
    def __call__(self, n):
        time.sleep(0.005)
        return n
    def close(self):
        time.sleep(3)

def alarmed(n):  # the stage uses a signal of its own (a per-item timer, say)
    import signal
    if signal.getsignal(signal.SIGALRM) is signal.SIG_DFL:
        signal.signal(signal.SIGALRM, lambda *_: None)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
    time.sleep(0.002)
    return n
"""


def _scale_busy_work_to_one(ws: Workspace, count: int, work: str) -> tuple[int, list[dict], list[int]]:
    """Run numbers -> work (``work``: its stage lines) -> sink, scale work to 1 process once items
    arrive; the exit code, the records and the items delivered."""
    ws.write("st.py", BUSY_STAGES)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "1s"\n'
        f'[stages.numbers]\nfunction = "st:numbers"\noptions = {{ count = {count} }}\n'
        f'[stages.work]\ninputs = ["numbers"]\nqueue = {{ batch = 4 }}\n{work}'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["work"]\n'
    )
    with reaped(ws.start_ready()) as proc:
        wait_until(lambda: (ws.path / "delivered").exists() or None)
        scaled = ws.run("scale", ws.name, "work=1", "--control", str(ws.control))
        assert scaled.code == 0, scaled.stderr
        proc.communicate(timeout=60)
    delivered = sorted(map(int, (ws.path / "delivered").read_text().split()))
    return proc.returncode, read_records(ws.path / "log.jsonl"), delivered


# A worker asked to leave (scale-down, reload, a regroup) takes no further batch: it kept taking
# them while its input was not empty, and was killed at the deadline holding one.
def test_a_worker_scaled_away_from_a_busy_queue_leaves_after_its_batch(ws: Workspace) -> None:
    code, records, delivered = _scale_busy_work_to_one(ws, 3000, 'function = "st:work"\nprocesses = 3\n')
    assert not [r for r in records if r["event"] in ("stop_escalated", "batch_abandoned")]
    assert delivered == list(range(3000))
    assert code == 0


def test_a_retired_worker_that_finished_its_batch_and_then_is_killed_lost_nothing(ws: Workspace) -> None:
    # redeliver = false: the slot file says whether a batch was taken and not finished; a
    # worker that left after finishing its batch (its close then outlasts the retire deadline)
    # held nothing, and the run must not say a batch was lost
    code, records, delivered = _scale_busy_work_to_one(
        ws, 600, 'function = "st:SlowClose"\nprocesses = 2\nredeliver = false\n'
    )
    assert any(r.get("signal") == "SIGKILL" for r in records if r["event"] == "worker_exited" and r["stage"] == "work")
    assert not [r for r in records if r["event"] == "batch_abandoned"]
    assert delivered == list(range(600))
    assert code == 0


def test_a_signal_the_stage_handles_itself_does_not_end_a_busy_worker(ws: Workspace) -> None:
    # only SIGTERM asks a worker to leave: a stage's own SIGALRM must not end it mid-input
    ws.write("st.py", BUSY_STAGES)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 400 }\n'
        '[stages.work]\nfunction = "st:alarmed"\ninputs = ["numbers"]\nqueue = { batch = 4 }\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["work"]\n'
    )
    log = ws.path / "log.jsonl"
    with reaped(ws.start_ready()) as proc:
        proc.communicate(timeout=60)
    records = read_records(log)
    assert len([r for r in records if r["event"] == "worker_spawned" and r["stage"] == "work"]) == 1
    assert sorted(map(int, (ws.path / "delivered").read_text().split())) == list(range(400))
    assert proc.returncode == 0
