"""The supervisor in the test process (issue 9): real forked workers, a logger from
``structlog.get_logger()`` that ``capture_logs`` sees, and a fake clock that jumps to the next
deadline whenever the loop is idle, so backoffs and timeouts of minutes pass in milliseconds.

Each of these tests would outlast the per-test timeout with the real clock (their backoffs and
stop timeouts add up to minutes); the workers' ``runtime_s`` of 0 shows the clock stood still
while they ran.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from typing import Any

import setproctitle
import structlog
from structlog.testing import capture_logs

from conftest import Workspace
from procd import callables
from procd.supervisor.core import Supervisor
from procd.supervisor.loop import AutojumpClock

_PR_SET_CHILD_SUBREAPER = 36

STAGES = """
import itertools, os, signal, time

def _bump(name):
    path = name + ".count"
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as fh:
        fh.write(str(n))
    return n

def crash():
    os._exit(1)
    yield

def crash_then_three(times):
    if _bump("crash") <= times:
        os._exit(1)
    yield from range(3)

def numbers(count):
    yield from range(count)

def fail_once(n):
    if n == 5 and _bump("fail_once") == 1:
        os._exit(3)
    return n

def same(n):
    return n

def sink(n):
    pass

def fail_once_heard(n):
    if n == 5 and _bump("fail_once") == 1:
        while not os.path.exists("deaf"):  # once the reader downstream ignores SIGTERM
            time.sleep(0.001)
        os._exit(3)
    return n

class Deaf:  # a reader that, asked to stop, asks the supervisor to stop instead (and goes on)

    def __call__(self, n):
        if not os.path.exists("deaf"):
            signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getppid(), signal.SIGTERM))
            signal.set_wakeup_fd(-1)  # or the worker's own stop descriptor still hears SIGTERM
            open("deaf", "w").close()

def stop_and_die_at_2(n):
    if n == 2:
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(1)

def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open("ignoring", "w").close()
    for n in itertools.count():
        yield n
        time.sleep(0.01)

def stop_the_supervisor():
    while not os.path.exists("ignoring"):  # once the stubborn producer ignores SIGTERM
        time.sleep(0.001)
    os.kill(os.getppid(), signal.SIGTERM)
    yield from ()
"""


@contextlib.contextmanager
def _as_supervisor() -> Iterator[None]:
    """``Supervisor.run`` names this process and makes it a subreaper: undo both after."""
    title = setproctitle.getproctitle()
    try:
        yield
    finally:
        setproctitle.setproctitle(title)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _run(
    ws: Workspace, pipeline: str, clock: Callable[[], float] | None = None, rand: Callable[[], float] = lambda: 0.0
) -> tuple[int, list[dict[str, Any]]]:
    ws.write("st.py", STAGES)
    spec = callables.load_or_raise(str(ws.pipeline(pipeline)), apart=True)
    with _as_supervisor(), capture_logs() as records, contextlib.chdir(ws.path):
        log = structlog.get_logger().bind(pipeline=spec.name)
        kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
        code = Supervisor(spec, log, control_path=str(ws.control), rand=rand, **kwargs).run()
    return code, records


def _events(records: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == name and all(r.get(k) == v for k, v in match.items())]


def test_capture_logs_sees_the_supervisors_records(ws: Workspace) -> None:
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 5 }\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["numbers"]\n',
    )
    assert code == 0
    assert records[0]["event"] == "pipeline_starting" and records[0]["log_level"] == "info"
    assert {r["stage"] for r in _events(records, "worker_spawned")} == {"numbers", "sink"}
    (drained,) = _events(records, "stage_drained", stage="sink")
    assert drained["items_in"] == 5
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["outcome"] == "finished"


def test_backoff_doubles_to_its_cap_then_the_stage_goes_fatal(ws: Workspace) -> None:
    clock = AutojumpClock()
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\n'
        '[stages.crash]\nfunction = "st:crash"\n'
        'restart = { policy = "on-failure", max = 5, within = "1h", backoff = "20s..5m" }\n',
        clock,
    )
    assert code == 1
    # rand() = 0: half of min(5m, 20s * 2 ** (failures - 1)), the cap reached at the fifth
    assert [r["restart_in_s"] for r in _events(records, "worker_backoff")] == [10.0, 20.0, 40.0, 80.0, 150.0]
    (fatal,) = _events(records, "stage_fatal")
    assert (fatal["restarts"], fatal["max"]) == (5, 5)
    exits = _events(records, "worker_exited")
    assert len(exits) == 6 and {r["runtime_s"] for r in exits} == {0.0}
    assert clock.now >= 1000.0 + 300.0


def test_restart_intensity_counts_only_the_restarts_inside_its_window(ws: Workspace) -> None:
    # a restart every 15 s (fake): three within 40 s trip the intensity ...
    backoff = 'restart = { policy = "on-failure", max = 3, within = "%s", backoff = "30s..30s" }\n'
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\n[stages.crash]\nfunction = "st:crash"\n' + backoff % "40s",
        AutojumpClock(),
    )
    assert code == 1
    (fatal,) = _events(records, "stage_fatal")
    assert fatal["restarts"] == 3 and fatal["within_s"] == 40.0
    assert len(_events(records, "worker_exited")) == 4
    # ... while within 20 s there are never more than two: six crashes, then it runs to its end
    (ws.path / "crash.count").unlink(missing_ok=True)
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\n'
        '[stages.crash]\nfunction = "st:crash_then_three"\noptions = { times = 6 }\n'
        + backoff % "20s"
        + '[stages.sink]\nfunction = "st:sink"\ninputs = ["crash"]\n',
        AutojumpClock(),
    )
    assert code == 0
    assert not _events(records, "stage_fatal")
    assert len(_events(records, "worker_backoff", stage="crash")) == 6
    (drained,) = _events(records, "stage_drained", stage="sink")
    assert drained["items_in"] == 3


def test_rest_for_one_restarts_the_failed_stage_and_downstream_upstream_first(ws: Workspace) -> None:
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 20 }\n'
        '[stages.middle]\nfunction = "st:fail_once"\ninputs = ["numbers"]\nprocesses = 2\n'
        'queue = { batch = 1 }\nstrategy = "rest_for_one"\n'
        'restart = { policy = "on-failure", backoff = "10s" }\n'
        '[stages.last]\nfunction = "st:same"\ninputs = ["middle"]\nqueue = { batch = 1 }\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["last"]\nqueue = { batch = 1 }\n',
        AutojumpClock(),
    )
    assert code == 0
    (group,) = _events(records, "group_restart")
    failed = _events(records, "worker_exited", stage="middle", code=3)[0]
    assert group["stage"] == "middle"
    others = {"middle[0]", "middle[1]"} - {f"middle[{failed['worker']}]"}
    # every stage downstream, and the failed stage's other worker unless it has already ended
    assert {"last[0]", "sink[0]"} <= set(group["workers"]) <= others | {"last[0]", "sink[0]"}
    after = records[records.index(group) :]
    members = [f"{r['stage']}[{r['worker']}]" for r in after if r["event"] == "worker_spawned"]
    # the group starts again upstream first (the failed worker restarts on its own backoff) ...
    upstream_first = [m for m in [*sorted(others), "last[0]", "sink[0]"] if m in group["workers"]]
    assert [m for m in members if m in group["workers"]] == upstream_first
    # ... once every member has ended; the producer is untouched
    first_start = next(i for i, r in enumerate(after) if r["event"] == "worker_spawned")
    ended = {f"{r['stage']}[{r['worker']}]" for r in after[:first_start] if r["event"] == "worker_exited"}
    assert set(group["workers"]) <= ended
    assert "numbers[0]" not in members
    (drained,) = _events(records, "stage_drained", stage="sink")
    assert drained["items_in"] >= 20  # at least once: a redelivered batch counts again


def test_a_worker_that_ignores_sigterm_is_killed_at_the_stop_timeout(ws: Workspace) -> None:
    clock = AutojumpClock()
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\nstop_timeout = "1h"\n'
        '[stages.stubborn]\nfunction = "st:stubborn"\n'
        '[stages.sink]\nfunction = "st:sink"\ninputs = ["stubborn"]\n'
        '[stages.trigger]\nfunction = "st:stop_the_supervisor"\n',
        clock,
    )
    assert code == 1
    (requested,) = _events(records, "stop_requested")
    assert requested["reason"] == "SIGTERM" and requested["stop_timeout_s"] == 3600.0
    # at the deadline, what still runs is killed: the stubborn producer, and its reader still
    # waiting for the end of its input
    escalated = _events(records, "stop_escalated")
    assert {r["stage"] for r in escalated} == {"stubborn", "sink"}
    assert {r["forced_by"] for r in escalated} == {"stop_timeout"}
    (killed,) = _events(records, "worker_exited", stage="stubborn")
    assert killed["signal"] == "SIGKILL" and killed["runtime_s"] >= 3600.0
    assert records[-1]["event"] == "pipeline_stopped" and sorted(records[-1]["forced"]) == ["sink[0]", "stubborn[0]"]
    assert clock.now >= 1000.0 + 3600.0


def test_a_stop_during_a_rest_for_one_restart_ends_the_group_for_good(ws: Workspace) -> None:
    # the group's member that ignores SIGTERM is still stopping when the pipeline is asked to
    # stop: it ends with the pipeline (at the end of its input), and the pipeline ends, instead
    # of waiting for a group restart that a stopping pipeline never makes (it hung)
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\nstop_timeout = "1h"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 20 }\n'
        '[stages.middle]\nfunction = "st:fail_once_heard"\ninputs = ["numbers"]\nqueue = { batch = 1 }\n'
        'strategy = "rest_for_one"\nrestart = { policy = "on-failure", backoff = "10s" }\n'
        '[stages.last]\nfunction = "st:Deaf"\ninputs = ["middle"]\nqueue = { batch = 1 }\n',
        AutojumpClock(threshold_s=0.2),
    )
    assert code == 1  # the middle's item in hand and those queued behind it were never delivered
    (group,) = _events(records, "group_restart")
    assert group["workers"] == ["last[0]"]
    (stop,) = _events(records, "stop_requested")
    assert stop["reason"] == "SIGTERM" and records.index(group) < records.index(stop)
    (last,) = _events(records, "worker_exited", stage="last")
    assert last["expected"] and last["code"] == 0
    assert len(_events(records, "worker_spawned", stage="last")) == 1  # the group never started again
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["outcome"] == "failed"
    assert records[-1]["abandoned"]["in_hand_items"] + records[-1]["abandoned"]["queued_batches"] > 0


def test_a_stop_that_leaves_items_in_a_local_queue_does_not_exit_0(ws: Workspace) -> None:
    # the reader dies holding an item just as the stop comes: a stopping pipeline restarts
    # nothing, so that item and those queued behind it are neither delivered nor dead-lettered,
    # and exit 0 would say they were
    code, records = _run(
        ws,
        '[pipeline]\nname = "{name}"\n'
        '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 10 }\n'
        '[stages.middle]\nfunction = "st:stop_and_die_at_2"\ninputs = ["numbers"]\nqueue = { batch = 1 }\n'
        'restart = { policy = "on-failure", backoff = "10s" }\n',
        AutojumpClock(threshold_s=0.2),
    )
    (stopped,) = _events(records, "pipeline_stopped")
    assert stopped["abandoned"]["in_hand_items"] + stopped["abandoned"]["queued_batches"] > 0
    assert code == 1
    assert stopped["outcome"] == "failed" and stopped["exit_code"] == 1
    assert any("neither delivered nor dead-lettered" in failure for failure in stopped["failures"])
