"""Restart policies: backoff and intensity arithmetic with a given clock (no waiting), then real
crashing workers restarted by a real supervisor."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import Workspace, parse_records, read_records, wait_until
from procd.restarts import RestartHistory, backoff_delay


@pytest.mark.parametrize(
    ("failures", "rand", "expected"),
    [
        (1, 0.0, 0.05),
        (1, 0.999999, 0.1),
        (2, 0.0, 0.1),
        (3, 0.0, 0.2),
        (4, 0.5, 0.6),
        (20, 0.0, 15.0),
        (500, 0.0, 15.0),
    ],
)
def test_backoff_is_exponential_capped_and_jittered(failures: int, rand: float, expected: float) -> None:
    assert backoff_delay(failures, 0.1, 30.0, lambda: rand) == pytest.approx(expected, rel=1e-5)


def test_backoff_of_zero_is_zero() -> None:
    assert backoff_delay(7, 0.0, 0.0, lambda: 0.7) == 0.0


def test_intensity_counts_restarts_in_a_sliding_window() -> None:
    history = RestartHistory(max_restarts=3, within_s=60.0)
    for now in (0.0, 10.0, 20.0):
        assert not history.exceeded(now)
        history.record(now)
    assert history.exceeded(30.0)  # a fourth restart within 60 s would be one too many
    assert history.count(59.9) == 3
    assert not history.exceeded(60.0)  # the first restart has left the window
    assert history.count(79.0) == 1 and history.count(80.0) == 0


def test_max_zero_means_no_restart_at_all() -> None:
    assert RestartHistory(max_restarts=0, within_s=1.0).exceeded(0.0)


CRASHY = """
import os, sys, time

def flaky(state_file, crashes):
    runs = int(open(state_file).read()) if os.path.exists(state_file) else 0
    with open(state_file, "w") as fh:
        fh.write(str(runs + 1))
    if runs < crashes:
        os._exit(3)
    yield from range(100)

def always_crash():
    os._exit(4)
    yield

def sink(item):
    pass

def forever():
    n = 0
    while True:
        yield n
        n += 1
        time.sleep(0.01)
"""


def test_on_failure_restarts_with_backoff_until_it_works(ws: Workspace) -> None:
    ws.write("st.py", CRASHY)
    ws.pipeline(
        '[stages.flaky]\nfunction = "st:flaky"\noptions = { state_file = "runs", crashes = 2 }\n'
        'restart = { policy = "on-failure", max = 5, backoff = "10ms..40ms" }\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["flaky"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    exits = result.events("worker_exited", stage="flaky")
    assert [e.get("code") for e in exits] == [3, 3, 0]
    assert [e["generation"] for e in exits] == [1, 2, 3]
    backoffs = result.events("worker_backoff", stage="flaky")
    assert [b["failures"] for b in backoffs] == [1, 2]
    assert 0.005 <= backoffs[0]["restart_in_s"] <= 0.01 and 0.01 <= backoffs[1]["restart_in_s"] <= 0.02
    assert [s["generation"] for s in result.events("worker_spawned", stage="flaky")] == [1, 2, 3]
    assert result.events("stage_drained", stage="sink")[0]["items_in"] == 100


def test_too_many_restarts_make_the_stage_fatal_and_the_run_exit_1(ws: Workspace) -> None:
    ws.write("st.py", CRASHY)
    ws.pipeline(
        '[defaults]\nrestart = { policy = "on-failure", max = 2, within = "60s", backoff = "1ms..5ms" }\n'
        '[stages.crash]\nfunction = "st:always_crash"\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["crash"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 1
    assert len(result.events("worker_exited", stage="crash")) == 3  # the first run and 2 restarts
    (fatal,) = result.events("stage_fatal")
    assert (fatal["stage"], fatal["restarts"], fatal["max"], fatal["within_s"]) == ("crash", 2, 2, 60.0)
    assert fatal["message"] == "crash restarted 2 times within 60s (max 2); giving up"
    assert result.events("pipeline_stopped")[0]["failures"] == [
        "crash[0]: stage crash is fatal after 2 restarts within 60s"
    ]


def test_always_restarts_a_producer_that_ends_and_sigkill_gets_a_new_pid(ws: Workspace) -> None:
    ws.write("st.py", CRASHY)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "5s"\n'
        '[stages.tick]\nfunction = "st:forever"\nrestart = { policy = "always", max = 50, backoff = "0s" }\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["tick"]\nrestart = { policy = "on-failure", backoff = "0s" }\n'
    )
    proc = ws.start("run", f"{ws.name}.toml", "--log-file", "log.jsonl")
    log = ws.path / "log.jsonl"
    try:

        def spawned(stage: str) -> list[dict]:
            return [r for r in read_records(log) if r["event"] == "worker_spawned" and r["stage"] == stage]

        first = wait_until(lambda: spawned("sink"))[0]
        os.kill(first["pid"], signal.SIGKILL)
        second = wait_until(lambda: spawned("sink")[1:])[0]
        assert second["generation"] == 2 and second["pid"] != first["pid"]
        os.kill(spawned("tick")[0]["pid"], signal.SIGKILL)
        wait_until(lambda: spawned("tick")[1:])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    records = parse_records(log.read_text())
    killed = [r for r in records if r["event"] == "worker_exited" and r.get("signal") == "SIGKILL"]
    assert {r["stage"] for r in killed} == {"sink", "tick"}
    assert proc.returncode == 0  # restarted workers, then a clean stop


def test_an_orphaned_grandchild_is_reaped_by_the_supervisor(ws: Workspace) -> None:
    ws.write(
        "st.py",
        "import time\nclass Slow:\n    def __call__(self, item):\n        print('orphan', item, flush=True)\n"
        "    def close(self):\n        time.sleep(1.0)\n",
    )
    # sh starts a background sleep and exits: the sleep's parent is gone, so the kernel gives it
    # to the nearest subreaper, the supervisor
    ws.pipeline(
        '[stages.spawner]\ncommand = ["sh", "-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"]\n'
        '[stages.slow]\nfunction = "st:Slow"\ninputs = ["spawner"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    (line,) = result.output_lines("slow")
    orphan = int(line.split()[1])
    (reaped,) = result.events("orphan_reaped")
    assert reaped["pid"] == orphan and reaped["code"] == 0


def test_rest_for_one_restarts_the_stage_and_everything_downstream_in_order(ws: Workspace) -> None:
    ws.write(
        "st.py",
        CRASHY
        + """
def once(n, marker):
    if n == 40 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return n

class Count:
    def __init__(self):
        self.n = 0
    def __call__(self, item):
        self.n += 1
    def close(self):
        print("count", self.n, flush=True)
""",
    )
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "5s"\n'
        '[stages.src]\nfunction = "st:forever"\n'
        '[stages.mid]\nfunction = "st:once"\ninputs = ["src"]\nprocesses = 2\noptions = { marker = "crashed" }\n'
        "queue = { maxsize = 20, batch = 1 }\n"
        'restart = { policy = "on-failure", backoff = "50ms" }\nstrategy = "rest_for_one"\n'
        '[stages.sink]\nfunction = "st:Count"\ninputs = ["mid"]\n'
    )
    proc = ws.start("run", f"{ws.name}.toml", "--log-file", "log.jsonl")
    log = ws.path / "log.jsonl"
    try:
        wait_until(lambda: len([r for r in read_records(log) if r["event"] == "worker_spawned"]) >= 7, timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    records = read_records(log)
    (group,) = [r for r in records if r["event"] == "group_restart"]
    crashed = [r for r in records if r["event"] == "worker_exited" and r.get("code") == 9]
    assert len(crashed) == 1 and crashed[0]["stage"] == "mid"
    other = f"mid[{1 - crashed[0]['worker']}]"
    assert group["workers"] == [other, "sink[0]"]
    respawned = [(r["stage"], r["worker"]) for r in records if r["event"] == "worker_spawned" and r["generation"] == 2]
    assert respawned.index(("mid", 1 - crashed[0]["worker"])) < respawned.index(("sink", 0))  # upstream first
    assert not [r for r in records if r["event"] == "worker_spawned" and r["stage"] == "src" and r["generation"] > 1]
    retired = [r for r in records if r["event"] == "worker_exited" and r["generation"] == 1 and r["stage"] == "sink"]
    assert retired[0]["code"] == 0 and retired[0]["expected"]  # the reader finished its batch and left
    assert proc.returncode == 0
