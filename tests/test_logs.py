"""procd logs over a real run's log file: filters, summary, timeline, stdin with junk, follow."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import Workspace, procd_command, wait_until

STAGES = """
import os

def numbers(count):
    yield from range(count)

def flaky(n, marker):
    if n == 150 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(5)
    if n == 42:
        raise ValueError("42 is poison")
    return n

def sink(n):
    pass
"""

PIPELINE = (
    '[defaults]\nrestart = { policy = "on-failure", backoff = "10ms" }\n'
    '[stages.numbers]\nfunction = "st:numbers"\noptions = { count = 300 }\n'
    '[stages.flaky]\nfunction = "st:flaky"\ninputs = ["numbers"]\noptions = { marker = "crashed" }\n'
    'dead_letter = "dead.jsonl"\nqueue = { maxsize = 50, batch = 10 }\n'
    '[stages.sink]\nfunction = "st:sink"\ninputs = ["flaky"]\n'
)


def _run(ws: Workspace):
    ws.write("st.py", STAGES)
    ws.pipeline(PIPELINE)
    result = ws.run("run", f"{ws.name}.toml", "--log-file", "log.jsonl")
    assert result.code == 0, result.stderr
    return result


def test_filters_and_json(ws: Workspace) -> None:
    result = _run(ws)
    exited = ws.run("logs", "log.jsonl", "--stage", "flaky", "--event", "worker_exited", "--json")
    records = [json.loads(line) for line in exited.stdout.splitlines()]
    assert [(r["generation"], r.get("code")) for r in records] == [(1, 5), (2, 0)]
    warnings = ws.run("logs", "log.jsonl", "--level", "warning", "--json").stdout.splitlines()
    assert {json.loads(line)["event"] for line in warnings} == {
        "worker_exited",
        "item_redelivered",
        "item_dead_lettered",
    }
    pid = records[0]["pid"]
    by_pid = [json.loads(line) for line in ws.run("logs", "log.jsonl", "--pid", str(pid), "--json").stdout.splitlines()]
    assert by_pid and all(r["pid"] == pid for r in by_pid)
    both = ws.run("logs", "log.jsonl", "--event", "pipeline_starting,pipeline_stopped", "--json").stdout
    assert [json.loads(line)["event"] for line in both.splitlines()] == ["pipeline_starting", "pipeline_stopped"]
    assert ws.run("logs", "log.jsonl", "--since", "1h").stdout.count("\n") == len(result.records)
    assert ws.run("logs", "log.jsonl", "--until", "2000-01-01T00:00:00").stdout == ""
    plain = ws.run("logs", "log.jsonl", "--event", "item_dead_lettered").stdout
    assert " flaky[0] " in plain and "item_dead_lettered" in plain and "\033[" not in plain  # no colour in a pipe
    bad = ws.run("logs", "log.jsonl", "--since", "yesterday")
    assert bad.code == 2 and "--since/--until take a duration" in bad.stderr


def test_summary_and_timeline(ws: Workspace) -> None:
    _run(ws)
    summary = ws.run("logs", "log.jsonl", "--summary").stdout.splitlines()
    header = summary[0].split()
    assert header[:8] == ["STAGE", "SPAWNS", "RESTARTS", "EXITS", "REDELIVERED", "DEAD_LETTERS", "IN", "OUT"]
    (flaky,) = [line for line in summary if line.startswith("flaky ")]
    assert flaky.split()[1:4] == ["2", "1", "code"]  # 2 spawns, 1 restart
    assert "code 0: 1, code 5: 1" in flaky
    after_exits = flaky.split("code 0: 1, code 5: 1")[1].split()
    assert after_exits[:2] == ["1", "1"]  # 1 batch redelivered, 1 dead letter
    assert int(after_exits[2]) >= 150  # the restarted process's count, and its predecessor's last report
    timeline = ws.run("logs", "log.jsonl", "--timeline", "flaky[0]").stdout.splitlines()
    assert timeline[0] == "flaky[0]"
    assert timeline[1].startswith("  generation 1  pid ") and "with code 5" in timeline[1]
    assert "(failure: exited with code 5)" in timeline[1]
    assert any(line.startswith("    worker_backoff ") for line in timeline)
    assert any(line.startswith("  generation 2  ") and "(expected)" in line for line in timeline)
    assert ws.run("logs", "log.jsonl", "--timeline", "flaky").code == 2


def test_stdin_with_lines_that_are_not_records(ws: Workspace) -> None:
    _run(ws)
    journal = "-- Journal begins --\nnot json\n" + (ws.path / "log.jsonl").read_text() + "[1, 2]\n"
    result = subprocess.run(
        procd_command("logs", "-", "--event", "pipeline_stopped", "--json"),
        input=journal,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ws.path,
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["exit_code"] == 0
    assert result.stderr == "procd logs: 3 lines were not procd records (skipped)\n"


def _read_to_end(pid: int, path: Path) -> bool:
    """Process ``pid`` has ``path`` open and its offset there is the file's size (/proc)."""
    size = path.stat().st_size
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    if int(fh.readline().split()[1]) == size:
                        return True
    except OSError:
        pass
    return False


def test_follow_shows_records_as_they_are_appended(ws: Workspace) -> None:
    _run(ws)
    log = ws.path / "log.jsonl"
    follower = subprocess.Popen(
        procd_command("logs", str(log), "--follow", "--event", "custom_event", "--json"),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ws.path,
    )
    try:
        # appended only once the follower has read to the end and waits: only --follow can show it
        wait_until(lambda: _read_to_end(follower.pid, log), timeout=15)
        with open(log, "a") as fh:
            fh.write('{"pipeline": "x", "event": "custom_event", "ts": "2026-01-01T00:00:00Z", "n": 1}\n')
        line = follower.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(line)["n"] == 1
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    wait_until(lambda: follower.poll() is not None)


def test_on_a_terminal_run_shows_a_progress_line_that_never_reaches_the_log(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(PIPELINE)
    code, screen = ws.run_on_pty("run", f"{ws.name}.toml", "--log-file", "log.jsonl")
    assert code == 0
    text = screen.decode(errors="replace")
    final = text.rstrip().splitlines()[-1].rsplit("\r\x1b[K", 1)[-1]
    assert final.startswith("numbers 300 → flaky ") and " → sink " in final and "items/s)" in final
    assert "\x1b[32m" in text  # records are drawn in colour on a terminal
    assert "→" not in (ws.path / "log.jsonl").read_text()
    assert all(json.loads(line) for line in (ws.path / "log.jsonl").read_text().splitlines())


def test_sigusr1_reopens_the_log_file_for_logrotate(ws: Workspace) -> None:
    import signal as signals

    ws.write(
        "st.py",
        "import itertools, time\ndef ticks():\n    for n in itertools.count():\n        yield n\n        time.sleep(0.01)\n",
    )
    ws.pipeline('[stages.ticks]\nfunction = "st:ticks"\n')
    proc = ws.start_ready()
    try:
        (ws.path / "log.jsonl").rename(ws.path / "log.jsonl.1")  # what logrotate does
        proc.send_signal(signals.SIGUSR1)
        wait_until(lambda: (ws.path / "log.jsonl").exists())
        proc.send_signal(signals.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    rotated = [json.loads(line)["event"] for line in (ws.path / "log.jsonl.1").read_text().splitlines()]
    fresh = [json.loads(line)["event"] for line in (ws.path / "log.jsonl").read_text().splitlines()]
    assert rotated[0] == "pipeline_starting" and "pipeline_stopped" not in rotated
    assert fresh[-1] == "pipeline_stopped" and "stop_requested" in fresh


def test_a_log_file_that_cannot_be_opened_is_a_usage_error(ws: Workspace) -> None:
    ws.pipeline('[stages.a]\ncommand = ["true"]\n')
    result = ws.run("run", f"{ws.name}.toml", "--log-file", "no/such/dir/log.jsonl")
    assert result.code == 2
    assert result.stderr == "procd: cannot open the log file no/such/dir/log.jsonl: No such file or directory\n"
