"""Writing records when the world is unkind: a closed stderr, a full disk under the log file, a
worker that floods its output, and the console form on a real terminal."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from conftest import Workspace, fill, procd_command, read_records, reaped, wait_until

# A producer that yields 500 items, waits for a file, then yields 500 more: the test decides
# when the pipeline may end, so it can take the terminal away while the pipeline runs.
GATED = """
import os, time

def gated():
    yield from range(500)
    while not os.path.exists("release"):
        time.sleep(0.01)
    yield from range(500, 1000)

def ticks():
    n = 0
    while True:
        yield n
        n += 1
        time.sleep(0.01)

def show(n):
    print("item", n, flush=True)

class Count:
    def __init__(self):
        self.n = 0
    def __call__(self, item):
        self.n += 1
    def close(self):
        print("received", self.n, flush=True)
"""


def _gated(ws: Workspace, producer: str = "gated") -> None:
    ws.write("st.py", GATED)
    ws.pipeline(
        f'[stages.source]\nfunction = "st:{producer}"\n'
        '[stages.count]\nfunction = "st:Count"\ninputs = ["source"]\nqueue = { maxsize = 100, batch = 10 }\n'
    )


def _start_with_stderr_pipe(ws: Workspace) -> subprocess.Popen[bytes]:
    """``procd run ... --log-file log.jsonl 2>&1 | head -1``: the reader goes after one line."""
    proc = subprocess.Popen(
        procd_command("run", f"{ws.name}.toml", "--log-file", "log.jsonl", "--control", str(ws.control)),
        cwd=ws.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["event"] == "pipeline_starting"
    proc.stdout.close()  # what `head -1` does once it has its line
    return proc


def _events(path: Path) -> list[str]:
    return [r["event"] for r in read_records(path)]


def test_a_closed_stderr_does_not_end_the_run_and_the_log_file_gets_every_record(ws: Workspace) -> None:
    _gated(ws)
    proc = _start_with_stderr_pipe(ws)
    with reaped(proc):
        wait_until(lambda: "pipeline_ready" in _events(ws.path / "log.jsonl"))
        assert proc.poll() is None  # still running without its terminal
        (ws.path / "release").touch()
        assert proc.wait(timeout=30) == 0
    records = read_records(ws.path / "log.jsonl")
    (lost,) = [r for r in records if r["event"] == "console_lost"]
    assert lost["error"] == "Broken pipe"
    output = [r["line"] for r in records if r["event"] == "worker_output" and r["stage"] == "count"]
    assert output == ["received 1000"]
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["exit_code"] == 0


def test_a_closed_stderr_then_a_signal_ends_with_the_true_outcome(ws: Workspace) -> None:
    _gated(ws, producer="ticks")
    proc = _start_with_stderr_pipe(ws)
    with reaped(proc):
        wait_until(lambda: "pipeline_ready" in _events(ws.path / "log.jsonl"))
        proc.send_signal(signal.SIGINT)  # Ctrl-C in `procd run ... | tee`: tee has gone first
        assert proc.wait(timeout=30) == 0
    records = read_records(ws.path / "log.jsonl")
    events = [r["event"] for r in records]
    assert events.index("stop_requested") < events.index("stage_drained") < events.index("pipeline_stopped")
    assert records[-1]["outcome"] == "stopped" and records[-1]["exit_code"] == 0


def test_a_config_error_reported_to_a_closed_stderr_still_exits_78(ws: Workspace) -> None:
    ws.pipeline('[stages.a]\ncommand = ["true"]\nqueue = { batch = 0 }\nprocesses = 0\n')
    proc = subprocess.Popen(
        procd_command("run", f"{ws.name}.toml"), cwd=ws.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.wait(timeout=30) == 78


def test_a_full_disk_under_the_log_file_drops_records_counted_and_never_stops_the_run(
    ws: Workspace, small_disk: Path
) -> None:
    ws.write("st.py", GATED)
    ws.pipeline(
        '[stages.source]\nfunction = "st:gated"\n'
        '[stages.show]\nfunction = "st:show"\ninputs = ["source"]\nqueue = { maxsize = 100, batch = 10 }\n'
    )
    log = small_disk / "log.jsonl"
    filler = fill(small_disk)
    proc = subprocess.Popen(
        procd_command("run", f"{ws.name}.toml", "--log-file", str(log), "--control", str(ws.control)),
        cwd=ws.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with reaped(proc):
        for line in proc.stderr:  # stderr still gets every record while the disk is full
            if json.loads(line).get("line") == "item 499":
                break
        assert proc.poll() is None and log.read_text() == ""
        filler.unlink()  # space returns
        (ws.path / "release").touch()
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    assert json.loads(rest.splitlines()[-1])["event"] == "pipeline_stopped"
    records = [json.loads(line) for line in log.read_text().splitlines()]  # no torn record
    dropped = records[0]
    assert dropped["event"] == "log_records_dropped" and dropped["error"] == "No space left on device"
    shown = [r["line"] for r in records if r["event"] == "worker_output"]
    assert dropped["records"] >= 500 and shown[-1] == "item 999"  # what was lost is counted
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["exit_code"] == 0


def test_the_console_on_a_terminal_is_the_compact_form(ws: Workspace) -> None:
    import re

    ws.write("st.py", GATED)
    ws.pipeline('[stages.source]\nfunction = "st:gated"\n[stages.count]\nfunction = "st:Count"\ninputs = ["source"]\n')
    (ws.path / "release").touch()
    code, screen = ws.run_on_pty("run", f"{ws.name}.toml")
    assert code == 0
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen.decode()).replace("\r\n", "\n")
    lines = [line.rsplit("\r", 1)[-1] for line in plain.splitlines() if line.strip()]
    records = [line for line in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)]
    assert len(records) >= 8, plain
    starting = next(line for line in records if "pipeline_starting" in line)
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} info {4}\s+ pipeline_starting stages=", starting)
    assert all(" pipeline=" not in line and " ts=" not in line for line in records)
    output = next(line for line in records if "worker_output" in line)
    assert output.split()[2:5] == ["count[0]", "worker_output", "pid=" + output.split("pid=")[1].split()[0]]
    # the event is a column: it starts at the same place on every line, with or without a worker
    known = ("pipeline_starting", "worker_spawned", "worker_output", "stage_drained", "pipeline_stopped")
    columns = {line.index(f" {e} ") for line in records for e in known if f" {e} " in line}
    assert len(columns) == 1, records
    assert 'stages=["source","count"]' in starting  # values as compact JSON, not as a Python repr
    stopped = next(line for line in records if "pipeline_stopped" in line)
    assert " failures=" not in stopped and " forced_by=" not in stopped  # nothing to say: not said
    assert "exit_code=0 outcome=finished" in stopped


def test_a_run_started_with_stdout_and_stderr_closed_keeps_its_files_off_them(ws: Workspace) -> None:
    import shlex

    _gated(ws)
    (ws.path / "release").touch()
    command = shlex.join(
        procd_command("run", f"{ws.name}.toml", "--log-file", "log.jsonl", "--control", str(ws.control))
    )
    proc = subprocess.run(["sh", "-c", f"exec {command} >&- 2>&-"], cwd=ws.path, timeout=30, check=False)
    assert proc.returncode == 0
    records = [json.loads(line) for line in (ws.path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["exit_code"] == 0
    assert [r["line"] for r in records if r["event"] == "worker_output"] == ["received 1000"]


FLOOD = """
import os, sys, time

def flood(lines):
    for n in range(lines):
        print("line", n, file=sys.stderr)
    while not os.path.exists("release"):
        time.sleep(0.01)
    print("after the flood", file=sys.stderr, flush=True)
    yield 1
"""


def _accounted(log: Path) -> int:
    records = read_records(log)
    return sum(r["lines"] for r in records if r["event"] == "worker_output_suppressed") + sum(
        1 for r in records if r["event"] == "worker_output"
    )


def test_a_flood_of_output_is_rate_limited_and_every_line_is_accounted_for(ws: Workspace) -> None:
    ws.write("st.py", FLOOD)
    ws.pipeline('[stages.flood]\nfunction = "st:flood"\noptions = { lines = 200000 }\n')
    proc = ws.start_quiet()
    with reaped(proc):
        # every line of the flood is accounted for while the worker still runs (quiet now, waiting
        # for the release): the count is reported within a second, not only when the worker ends
        wait_until(lambda: _accounted(ws.path / "log.jsonl") == 200_000, timeout=30)
        assert proc.poll() is None
        (ws.path / "release").touch()
        assert proc.wait(timeout=30) == 0
    records = read_records(ws.path / "log.jsonl")
    shown = [r["line"] for r in records if r["event"] == "worker_output"]
    suppressed = [r for r in records if r["event"] == "worker_output_suppressed"]
    assert shown[-1] == "after the flood"  # the flood is over: lines are logged again
    assert len(shown) < 20_000  # bounded: the log does not take every line of a flood
    assert sum(r["lines"] for r in suppressed) + len(shown) == 200_001  # and every line is counted
    assert all(r["stage"] == "flood" and r["worker"] == 0 and r["bytes"] > 0 for r in suppressed)


def test_the_output_budget_with_a_fake_clock() -> None:
    from procd.throttle import OutputThrottle, Suppressed

    throttle = OutputThrottle(now=0.0, rate_per_s=1.0, burst=3)
    assert throttle.admit([b"a", b"b", b"c", b"dd", b"eee"], now=0.0) == 3
    assert throttle.report_due() == 1.0
    assert throttle.admit([b"f"], now=0.5) == 0  # half a token
    assert throttle.admit([b"g", b"h"], now=1.0) == 1  # one whole token again
    assert throttle.take(now=1.0) == Suppressed(lines=4, bytes=7, since_s=0.0, until_s=1.0)
    assert throttle.take(now=2.0) is None and throttle.report_due() is None
    assert throttle.admit([b"x"] * 10, now=100.0) == 3  # refills up to the burst, no further


def test_a_log_file_that_cannot_be_reopened_keeps_the_old_one(ws: Workspace) -> None:
    _gated(ws)
    logs = ws.path / "logs"
    logs.mkdir()
    proc = ws.start_quiet(log="logs/log.jsonl")
    with reaped(proc):
        wait_until(lambda: "pipeline_ready" in _events(logs / "log.jsonl"))
        (logs / "log.jsonl").rename(ws.path / "log.jsonl.1")
        logs.rmdir()  # logrotate's SIGUSR1 comes, and the file cannot be made again
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: "log_reopen_failed" in _events(ws.path / "log.jsonl.1"))
        (ws.path / "release").touch()
        assert proc.wait(timeout=30) == 0
    records = read_records(ws.path / "log.jsonl.1")
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["exit_code"] == 0
