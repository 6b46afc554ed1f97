"""``procd run`` end to end: real processes, real signals, the JSON records as the evidence."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time

import pytest

from conftest import Workspace, parent_of, parse_records, processes_titled, wait_until
from procd import config

PY = sys.executable


def drained(result, stage: str) -> dict:
    (record,) = result.events("stage_drained", stage=stage)
    return record


def test_producer_alone(ws: Workspace) -> None:
    ws.write("st.py", "def numbers(count):\n    yield from range(count)\n")
    ws.pipeline('[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 1234 }\n')
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    assert drained(result, "numbers")["items_out"] == 1234
    (stopped,) = result.events("pipeline_stopped")
    assert stopped["exit_code"] == 0 and stopped["outcome"] == "finished"


STAGES = """
import os, sys

def numbers(count, start=0):
    yield from range(start, start + count)

def double(n):
    return n * 2

def twice(n):
    yield n
    yield -n

def odd_only(n, keep=1):
    return n if n % 2 == keep else None

class Collect:
    def __init__(self, label="collect"):
        self.label = label
        self.items = []

    def __call__(self, item):
        self.items.append(item)

    def close(self):
        print(self.label, len(self.items), sum(x for x in self.items if isinstance(x, int)), flush=True)

class Tally:
    '''A transform whose close() emits one last item downstream.'''
    def __init__(self):
        self.n = 0
    def __call__(self, item):
        self.n += 1
        return item
    def close(self):
        yield "tally:%d" % self.n
"""


def test_fan_out_every_reader_gets_every_item(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        """
        [stages.src]
        function = "st:numbers"
        options = { count = 5000 }
        [stages.left]
        function = "st:Collect"
        inputs = ["src"]
        processes = 2
        options = { label = "left" }
        [stages.right]
        function = "st:Collect"
        inputs = ["src"]
        options = { label = "right" }
        """
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    assert drained(result, "left")["items_in"] == 5000
    assert drained(result, "right")["items_in"] == 5000
    assert f"right 5000 {sum(range(5000))}" in result.output_lines("right")
    # two processes share the left stage's queue: each item went to exactly one of them
    left = [line.split() for line in result.output_lines("left")]
    assert sum(int(n) for _label, n, _total in left) == 5000
    assert sum(int(total) for _label, _n, total in left) == sum(range(5000))


def test_fan_in_generators_options_and_class_close(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        """
        [pipeline]
        name = "{name}"
        [stages.low]
        function = "st:numbers"
        options = { count = 100 }
        [stages.high]
        function = "st:numbers"
        options = { count = 100, start = 1000 }
        [stages.both]
        function = "st:twice"
        inputs = ["low", "high"]
        processes = 3
        [stages.odd]
        function = "st:odd_only"
        inputs = ["both"]
        options = { keep = 1 }
        [stages.tally]
        function = "st:Tally"
        inputs = ["odd"]
        [stages.sink]
        function = "st:Collect"
        inputs = ["tally"]
        """
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    assert drained(result, "both")["items_in"] == 200
    assert drained(result, "both")["items_out"] == 400  # the generator yields two per item
    values = [n for n in list(range(100)) + list(range(1000, 1100)) for n in (n, -n)]
    odd = [v for v in values if v % 2 == 1]
    assert drained(result, "odd")["items_out"] == len(odd)
    # the sink got every odd value plus the tally's closing item (a string, not summed)
    assert result.output_lines("sink") == [f"collect {len(odd) + 1} {sum(odd)}"]


def test_command_stages_python_and_not_python(ws: Workspace) -> None:
    ws.write(
        "upper.py",
        """
        import json, sys
        print("upper starting", file=sys.stderr, flush=True)
        for line in sys.stdin:
            item = json.loads(line)
            print(json.dumps({"n": item, "word": "x" * (item % 3)}), flush=True)
        """,
    )
    ws.write("st.py", STAGES)
    ws.pipeline(
        f"""
        [stages.seq]
        command = ["seq", "1", "300"]
        [stages.upper]
        command = ["{PY}", "upper.py"]
        inputs = ["seq"]
        processes = 2
        [stages.awk]
        command = ["awk", "{{ print \\"line \\" NR }}"]
        inputs = ["upper"]
        [stages.sink]
        function = "st:Collect"
        inputs = ["awk"]
        """
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    assert drained(result, "seq")["items_out"] == 300  # "1".."300" parsed as JSON numbers
    assert drained(result, "upper")["items_out"] == 300
    assert drained(result, "awk")["items_in"] == 300
    assert result.output_lines("sink") == ["collect 300 0"]  # awk printed plain text: strings
    assert result.output_lines("upper").count("upper starting") == 2  # stderr lines become records


def test_command_stage_items_are_json_lines(ws: Workspace) -> None:
    ws.write(
        "check.py",
        """
        import json, sys
        seen = [json.loads(line) for line in sys.stdin]
        print(json.dumps({"count": len(seen), "first": seen[0]}))
        """,
    )
    ws.write("st.py", "def rows():\n    for i in range(50):\n        yield {'id': i, 'tags': ['a', 'b'], 'ok': True}\n")
    ws.pipeline(
        f'[stages.rows]\nfunction = "st:rows"\n'
        f'[stages.check]\ncommand = ["{PY}", "check.py"]\ninputs = ["rows"]\n'
        f'[stages.show]\ncommand = ["cat"]\ninputs = ["check"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml", "--log-file", "log.jsonl")
    assert result.code == 0, result.stderr
    assert drained(result, "show")["items_in"] == 1
    assert drained(result, "check")["items_out"] == 1
    # the log file holds the same records as stderr
    assert parse_records((ws.path / "log.jsonl").read_text()) == result.records


def test_spawn_start_method_runs_a_fresh_interpreter(ws: Workspace) -> None:
    ws.write(
        "st.py",
        """
        import sys
        def numbers():
            print("fresh" if "procd.cli" not in sys.modules else "forked", flush=True)
            yield from range(10)
        def show(n):
            return n
        """,
    )
    for method in ("spawn", "forkserver", "fork"):
        ws.pipeline(
            f'[pipeline]\nname = "{ws.name}"\nstart_method = "{method}"\n'
            '[stages.numbers]\nfunction = "st:numbers"\n'
            '[stages.show]\nfunction = "st:show"\ninputs = ["numbers"]\n'
        )
        result = ws.run("run", f"{ws.name}.toml")
        assert result.code == 0, result.stderr
        assert result.output_lines("numbers") == ["forked" if method == "fork" else "fresh"]
        assert drained(result, "show")["items_in"] == 10


def test_spawn_carries_a_large_options_table(ws: Workspace) -> None:
    """The worker's context travels through a pipe, not argv: one argument may hold 128 KiB at most."""
    ws.write(
        "st.py",
        """
        def numbers(blob):
            yield len(blob)
        def show(n):
            print(n, flush=True)
        """,
    )
    for method in ("spawn", "forkserver"):
        ws.pipeline(
            f'[pipeline]\nname = "{ws.name}"\nstart_method = "{method}"\n'
            f'[stages.numbers]\nfunction = "st:numbers"\noptions = {{ blob = "{"x" * 300_000}" }}\n'
            '[stages.show]\nfunction = "st:show"\ninputs = ["numbers"]\n'
        )
        result = ws.run("run", f"{ws.name}.toml")
        assert result.code == 0, result.stderr[-2000:]
        assert not result.events("spawn_failed")
        assert result.output_lines("show") == ["300000"]


def test_an_exception_in_user_code_is_retried_then_dead_lettered_and_the_run_goes_on(ws: Workspace) -> None:
    ws.write(
        "st.py",
        """
        import os
        def numbers():
            yield from range(1000)
        def fragile(n):
            if n == 250:
                raise ValueError("cannot handle 250")
            if n == 500 and not os.path.exists("flaked"):
                open("flaked", "w").close()
                raise RuntimeError("only once")
            return n
        class Sum:
            def __init__(self):
                self.items = []
            def __call__(self, n):
                self.items.append(n)
            def close(self):
                print(len(self.items), sum(self.items), flush=True)
        """,
    )
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n'
        '[stages.fragile]\nfunction = "st:fragile"\ninputs = ["numbers"]\nmax_attempts = 3\n'
        'dead_letter = "dead.jsonl"\nqueue = { maxsize = 50, batch = 10 }\n'
        '[stages.sink]\nfunction = "st:Sum"\ninputs = ["fragile"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr
    assert result.output_lines("sink") == [f"999 {sum(range(1000)) - 250}"]  # 500 made it on its retry
    (dead,) = result.events("item_dead_lettered", stage="fragile")
    assert (dead["error_type"], dead["error"], dead["attempts"]) == ("ValueError", "cannot handle 250", 3)
    assert dead["file"] == str(ws.path / "dead.jsonl")
    (entry,) = [json.loads(line) for line in (ws.path / "dead.jsonl").read_text().splitlines()]
    assert entry["item"] == 250 and entry["stage"] == "fragile" and entry["attempts"] == 3
    assert entry["error_type"] == "ValueError" and "raise ValueError" in entry["traceback"]
    assert not result.events("worker_error")


ENDLESS = """
import itertools, signal, time

def endless():
    for n in itertools.count():
        yield n
        if n % 50 == 0:
            time.sleep(0.005)

def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for n in itertools.count():
        yield n
        time.sleep(0.01)

def slow(n):
    return n

class Count:
    def __init__(self):
        self.n = 0
    def __call__(self, item):
        self.n += 1
    def close(self):
        print("received", self.n, flush=True)
"""


def _start_and_wait_ready(ws: Workspace):
    return ws.start_ready(), ws.path / "log.jsonl"


def test_sigterm_mid_run_drains_cleanly_and_exits_0(ws: Workspace) -> None:
    ws.write("st.py", ENDLESS)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "10s"\n'
        '[stages.endless]\nfunction = "st:endless"\n'
        '[stages.slow]\nfunction = "st:slow"\ninputs = ["endless"]\nprocesses = 2\nqueue = { maxsize = 500, batch = 50 }\n'
        '[stages.count]\nfunction = "st:Count"\ninputs = ["slow"]\n'
    )
    proc, logfile = _start_and_wait_ready(ws)

    def counted() -> int:
        reply = json.loads(ws.run("status", "--json", "--control", str(ws.control)).stdout)
        return int(next(s["items_in"] for s in reply["stages"] if s["name"] == "count"))

    wait_until(counted, timeout=15)  # items have reached the last stage: the stop drains a full pipeline
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 0
    records = parse_records(logfile.read_text())
    produced = next(r for r in records if r["event"] == "stage_drained" and r["stage"] == "endless")["items_out"]
    assert produced > 0
    lines = [r["line"] for r in records if r["event"] == "worker_output" and r["stage"] == "count"]
    assert lines == [f"received {produced}"]  # nothing lost in the drain
    events = [r["event"] for r in records]
    assert events.index("stop_requested") < events.index("pipeline_stopped")
    assert not [r for r in records if r["event"] == "stop_escalated"]


def test_worker_that_ignores_sigterm_is_killed_and_run_exits_1(ws: Workspace) -> None:
    ws.write("st.py", ENDLESS)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "500ms"\n'
        '[stages.stubborn]\nfunction = "st:stubborn"\n'
        '[stages.count]\nfunction = "st:Count"\ninputs = ["stubborn"]\n'
    )
    proc, logfile = _start_and_wait_ready(ws)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert time.monotonic() - started < 10
    records = parse_records(logfile.read_text())
    # at the deadline the producer is still there, so its reader's input has not ended either
    escalated, reader = [r for r in records if r["event"] == "stop_escalated"]
    assert (escalated["stage"], reader["stage"]) == ("stubborn", "count")
    assert escalated["message"] == (
        "stubborn[0] still running 0.5s after the stop request; sending SIGKILL to its process group"
    )
    (exited,) = [r for r in records if r["event"] == "worker_exited" and r["stage"] == "stubborn"]
    assert exited["signal"] == "SIGKILL" and exited["expected"] is False
    assert next(r for r in records if r["event"] == "pipeline_stopped")["forced"] == ["stubborn[0]", "count[0]"]


def test_process_titles_process_groups_and_worker_records(ws: Workspace) -> None:
    ws.write("st.py", ENDLESS)
    ws.pipeline(
        '[stages.endless]\nfunction = "st:endless"\n'
        '[stages.slow]\nfunction = "st:slow"\ninputs = ["endless"]\nprocesses = 3\n'
        '[stages.sink]\ncommand = ["cat"]\ninputs = ["slow"]\n'
    )
    proc, logfile = _start_and_wait_ready(ws)
    try:
        titles = processes_titled(f"procd: {ws.name}")
        assert sorted(titles.values()) == sorted(
            [f"procd: {ws.name} supervisor", f"procd: {ws.name}/endless[0]", f"procd: {ws.name}/sink[0]"]
            + [f"procd: {ws.name}/slow[{i}]" for i in range(3)]
        )
        assert titles[proc.pid] == f"procd: {ws.name} supervisor"
        records = parse_records(logfile.read_text())
        spawned = [r for r in records if r["event"] == "worker_spawned"]
        assert len(spawned) == 5
        for record in spawned:
            assert record["pipeline"] == ws.name
            assert titles[record["pid"]] == f"procd: {ws.name}/{record['stage']}[{record['worker']}]"
            assert os.getpgid(record["pid"]) == record["pid"]  # each worker leads its own group
            assert record["generation"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


@pytest.mark.parametrize(("undo", "number"), [('rm -f "$0"', errno.ENOENT), ('chmod -x "$0"', errno.EACCES)])
def test_exec_failure_is_reported_with_its_errno(ws: Workspace, undo: str, number: int) -> None:
    # `check` (and so `run`) refuses a program that is missing or not executable; one that goes
    # away while the pipeline runs is found out by exec when its worker starts again
    ws.write("prog", f"#!/bin/sh\n{undo}\nexit 1\n")
    os.chmod(ws.path / "prog", 0o755)
    ws.pipeline('[stages.p]\ncommand = ["./prog"]\nrestart = { backoff = "10ms" }\n')
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 1
    (failed,) = result.events("spawn_failed", stage="p")
    assert failed["errno"] == number and failed["error"] == os.strerror(number)
    assert failed["program"] == "./prog"
    first, second = result.events("worker_exited", stage="p")
    assert first["code"] == 1
    assert second["cause"] == f"cannot execute ./prog: {os.strerror(number)}"


def test_consumer_that_exits_before_its_input_ends_is_a_failure(ws: Workspace) -> None:
    ws.write("st.py", ENDLESS)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "2s"\n'
        '[stages.endless]\nfunction = "st:endless"\n'
        '[stages.quitter]\ncommand = ["true"]\ninputs = ["endless"]\n'
    )
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 1
    exits = result.events("worker_exited", stage="quitter")
    assert len(exits) > 1  # a failure of the worker: restarted by its policy, like a crash
    assert {(r["code"], r["cause"]) for r in exits} == {(0, "exited before the end of its input")}
    assert result.events("stage_fatal", stage="quitter")


def test_sigkill_of_the_supervisor_takes_every_worker_with_it(ws: Workspace) -> None:
    ws.write("st.py", ENDLESS)
    ws.pipeline(
        '[stages.endless]\nfunction = "st:endless"\n'
        '[stages.slow]\nfunction = "st:slow"\ninputs = ["endless"]\nprocesses = 2\n'
        '[stages.sink]\ncommand = ["cat"]\ninputs = ["slow"]\n'
    )
    proc, _logfile = _start_and_wait_ready(ws)
    workers = processes_titled(f"procd: {ws.name}/")
    assert len(workers) == 4
    # this pipeline's own cat: in the process group of its sink's bridge (never another test's cat)
    sink_group = next(_group(pid) for pid, title in workers.items() if title.startswith(f"procd: {ws.name}/sink"))
    ours = wait_until(lambda: [p for p in processes_titled("cat") if _group(p) == sink_group], timeout=10)
    proc.kill()
    proc.communicate(timeout=10)
    wait_until(lambda: not processes_titled(f"procd: {ws.name}"), timeout=5)
    # the command stage's program (cat) died with its bridge too
    wait_until(lambda: not set(ours) & set(processes_titled("cat")), timeout=5)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_bad_config_exits_78_before_any_process_starts(ws: Workspace) -> None:
    ws.pipeline('[stages.a]\nfunction = "nosuchmodule:f"\nprocesses = "four"\n')
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 78
    assert result.stderr.splitlines() == [
        f'{ws.name}.toml: stages.a.processes: expected an integer from 1 to {config.default_max_processes()}, got "four" (str)',
        f'{ws.name}.toml: stages.a.function: cannot import module "nosuchmodule": '
        "ModuleNotFoundError: No module named 'nosuchmodule'",
    ]
    ws.pipeline('[stages.a]\nfunction = "nosuchmodule:f"\n[stages.b]\nfunction = "st:nope"\ninputs = ["a"]\n')
    ws.write("st.py", "def yes(x):\n    return x\n")
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 78
    assert result.stderr.splitlines() == [
        f'{ws.name}.toml: stages.a.function: cannot import module "nosuchmodule": '
        "ModuleNotFoundError: No module named 'nosuchmodule'",
        f'{ws.name}.toml: stages.b.function: module "st" has no attribute "nope"',
    ]
    result = ws.run("run", "missing.toml")
    assert result.code == 78
    assert result.stderr == "missing.toml: cannot read the file: No such file or directory\n"


def test_a_second_sigterm_kills_at_once(ws: Workspace) -> None:
    ws.write("st.py", ENDLESS)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstop_timeout = "30s"\n'
        '[stages.stubborn]\nfunction = "st:stubborn"\n'
        '[stages.count]\nfunction = "st:Count"\ninputs = ["stubborn"]\n'
    )
    proc, logfile = _start_and_wait_ready(ws)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: '"stop_requested"' in logfile.read_text())
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert time.monotonic() - started < 10  # not the 30 s stop timeout
    records = parse_records(logfile.read_text())
    messages = [r.get("message") for r in records if r["event"] == "stop_requested"]
    assert messages == [None, "second stop request (SIGTERM); killing every worker now"]
    assert [r["stage"] for r in records if r["event"] == "stop_escalated"] == ["stubborn", "count"]


def test_forkserver_workers_are_the_supervisor_s_children(ws: Workspace) -> None:
    ws.write("st.py", ENDLESS)
    ws.pipeline(
        '[pipeline]\nname = "{name}"\nstart_method = "forkserver"\n'
        '[stages.endless]\nfunction = "st:endless"\n'
        '[stages.slow]\nfunction = "st:slow"\ninputs = ["endless"]\nprocesses = 2\n'
    )
    proc, logfile = _start_and_wait_ready(ws)
    try:
        titles = processes_titled(f"procd: {ws.name}")
        (server,) = [pid for pid, title in titles.items() if title == f"procd: {ws.name} forkserver"]
        workers = [pid for pid, title in titles.items() if "/" in title]
        assert len(workers) == 3
        assert all(parent_of(pid) == proc.pid for pid in workers)  # re-parented to the supervisor
        assert parent_of(server) == proc.pid
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: len([p for p, t in processes_titled(f"procd: {ws.name}/").items() if p != workers[0]]) == 3)
        assert all(parent_of(pid) == proc.pid for pid in processes_titled(f"procd: {ws.name}/"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    records = parse_records(logfile.read_text())
    assert [r["event"] for r in records].count("forkserver_started") == 1
    assert not [r for r in records if r["event"] == "orphan_reaped"]


def test_output_without_line_ends_is_cut_into_bounded_records(ws: Workspace) -> None:
    ws.write(
        "st.py",
        "import sys\ndef shout():\n    sys.stdout.write('x' * 200_000)\n    sys.stdout.flush()\n    yield 1\n",
    )
    ws.pipeline('[stages.shout]\nfunction = "st:shout"\n')
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr[-500:]
    lines = result.output_lines("shout")
    assert sum(len(line) for line in lines) == 200_000  # nothing lost
    assert max(len(line) for line in lines) <= 4096  # and no record is unbounded


def test_a_long_line_is_cut_the_same_way_however_it_arrives(ws: Workspace) -> None:
    """A line with its end that arrives in one read is cut like one that arrives in pieces (which
    one happens depends on the pipe's timing: a record's size must not)."""
    ws.write("st.py", "def shout():\n    print('y' * 10_000, flush=True)\n    yield 1\n")
    ws.pipeline('[stages.shout]\nfunction = "st:shout"\n')
    result = ws.run("run", f"{ws.name}.toml")
    assert result.code == 0, result.stderr[-500:]
    lines = result.output_lines("shout")
    assert "".join(lines) == "y" * 10_000
    assert max(len(line) for line in lines) <= 4096
