"""Reload checks the new file in a child the loop watches (issue 9): the supervisor keeps serving
while stage code is imported, answers the reload when the check ends, and a check that overstays
``pipeline.reload_timeout`` fails the reload, not procd."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess

from conftest import Workspace, procd_command, processes_titled, read_records, reaped, wait_until

STAGES = """
import itertools, time

def ticks():
    for n in itertools.count():
        yield n
        time.sleep(0.01)

def same(n):
    return n
"""

# imported by the reload's check: waits until the test opens the gate (never, for the deadline test)
GATED = """
import os, time
while not os.path.exists("gate"):
    time.sleep(0.01)

def same(n):
    return n
"""

PIPELINE = """
[pipeline]
name = "{name}"
reload_timeout = "%s"
[stages.ticks]
function = "st:ticks"
[stages.same]
function = "%s"
inputs = ["ticks"]
"""


def _status(ws: Workspace) -> dict:
    result = ws.run("status", "--json", "--control", str(ws.control), timeout=10)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def _pids(reply: dict) -> dict[str, list[int]]:
    return {s["name"]: [w["pid"] for w in s["workers"]] for s in reply["stages"]}


def _reload(ws: Workspace) -> subprocess.Popen[str]:
    return subprocess.Popen(
        procd_command("reload", "--control", str(ws.control)),
        cwd=ws.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_status_answers_while_a_reload_imports_and_the_reload_answers_when_the_check_ends(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.write("gated.py", GATED)
    ws.pipeline(PIPELINE % ("60s", "st:same"))
    with reaped(ws.start_ready()) as proc:
        before = _pids(_status(ws))
        ws.pipeline(PIPELINE % ("60s", "gated:same"))
        with reaped(_reload(ws)) as reload:
            log = ws.path / "log.jsonl"
            wait_until(lambda: any(r["event"] == "reload_requested" for r in read_records(log)))
            # the check runs, gated (its title is set just after the fork that the record follows)
            assert wait_until(lambda: processes_titled(f"procd: {ws.name} reload check"))
            reply = _status(ws)  # the loop answers while the check imports
            assert _pids(reply) == before
            assert reload.poll() is None  # and the reload is still waiting for its answer
            (ws.path / "gate").touch()
            out, err = reload.communicate(timeout=30)
        assert reload.returncode == 0, err
        assert "same" in out
        records = read_records(log)
        (reloaded,) = [r for r in records if r["event"] == "pipeline_reloaded"]
        assert reloaded["code_changed"] == ["same"] or reloaded["changed"] == ["same"]
        wait_until(lambda: _pids(_status(ws))["same"] != before["same"] and all(_pids(_status(ws))["same"]))
        assert _pids(_status(ws))["ticks"] == before["ticks"]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_a_check_past_the_reload_timeout_fails_the_reload_and_the_pipeline_runs_on(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.write("gated.py", GATED)
    ws.pipeline(PIPELINE % ("1s", "st:same"))
    with reaped(ws.start_ready()) as proc:
        before = _pids(_status(ws))
        ws.pipeline(PIPELINE % ("1s", "gated:same"))  # its gate never opens
        with reaped(_reload(ws)) as reload:
            out, err = reload.communicate(timeout=30)
        assert reload.returncode == 1 and out == ""
        assert err == (
            "procd reload: checking the new pipeline file did not finish within 1s "
            "(pipeline.reload_timeout); nothing changed\n"
        )
        log = ws.path / "log.jsonl"
        (failed,) = [r for r in read_records(log) if r["event"] == "reload_failed"]
        assert failed["timeout_s"] == 1.0 and failed["cause"] == "timeout"
        wait_until(lambda: not processes_titled(f"procd: {ws.name} reload check"))  # killed and reaped
        assert _pids(_status(ws)) == before  # running on, unchanged
        assert not [r for r in read_records(log) if r["event"] in ("pipeline_reloaded", "orphan_reaped")]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_a_reload_timeout_out_of_range_is_a_config_error(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(PIPELINE % ("0s", "st:same"))
    result = ws.run("check", f"{ws.name}.toml")
    assert result.code == 78
    assert result.stderr == (
        f'{ws.name}.toml: pipeline.reload_timeout: expected a duration from 100ms to 1h, got "0s" (str)\n'
    )


def test_one_reload_at_a_time_and_a_stop_abandons_the_one_under_way(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.write("gated.py", GATED)
    ws.pipeline(PIPELINE % ("60s", "st:same"))
    with reaped(ws.start_ready()) as proc:
        ws.pipeline(PIPELINE % ("60s", "gated:same"))  # its gate never opens
        with reaped(_reload(ws)) as first:
            wait_until(lambda: processes_titled(f"procd: {ws.name} reload check"))
            second = ws.run("reload", "--control", str(ws.control))
            assert second.code == 1
            assert second.stderr == (
                "procd reload: a reload is under way already (requested by control socket); "
                "try again once it has ended\n"
            )
            proc.send_signal(signal.SIGTERM)
            out, err = first.communicate(timeout=30)
        assert first.returncode == 1 and out == ""
        assert err == "procd reload: the pipeline is stopping; the reload was abandoned, nothing changed\n"
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    records = read_records(ws.path / "log.jsonl")
    (failed,) = [r for r in records if r["event"] == "reload_failed"]
    assert failed["cause"] == "stopping"
    assert not processes_titled(f"procd: {ws.name} reload check")
    assert not [r for r in records if r["event"] == "orphan_reaped"]


def test_replies_on_one_connection_keep_their_order_behind_a_deferred_reload(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.write("gated.py", GATED)
    ws.pipeline(PIPELINE % ("60s", "st:same"))
    with reaped(ws.start_ready()) as proc:
        ws.pipeline(PIPELINE % ("60s", "gated:same"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            client.connect(str(ws.control))
            client.sendall(b'{"command": "reload"}\n{"command": "status"}\n')
            wait_until(lambda: processes_titled(f"procd: {ws.name} reload check"))
            assert _status(ws)["stages"]  # another client is served meanwhile
            (ws.path / "gate").touch()
            data = b""
            while data.count(b"\n") < 2:
                chunk = client.recv(65536)
                assert chunk, "procd closed the connection"
                data += chunk
        reload_reply, status_reply = (json.loads(line) for line in data.splitlines())
        assert reload_reply["ok"] and "changed" in reload_reply
        assert status_reply["ok"] and "stages" in status_reply
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_the_watchdog_is_pinged_while_a_reload_imports(ws: Workspace) -> None:
    """The fault: the loop waited for the import, and systemd killed a procd whose import took
    longer than WatchdogSec. Now pings go on while the check is held at its gate."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(ws.path / "notify.sock"))
    receiver.setblocking(False)

    def keys() -> list[str]:
        found = []
        with contextlib.suppress(BlockingIOError):
            while True:
                found += [line.split("=", 1)[0] for line in receiver.recv(4096).decode().splitlines()]
        return found

    ws.write("st.py", STAGES)
    ws.write("gated.py", GATED)
    ws.pipeline(PIPELINE % ("60s", "st:same"))
    env = {**os.environ, "NOTIFY_SOCKET": str(ws.path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    command = procd_command("run", f"{ws.name}.toml", "--log-file", "log.jsonl", "--control", str(ws.control))
    try:
        with reaped(subprocess.Popen(command, cwd=ws.path, env=env, stderr=subprocess.DEVNULL)) as proc:
            seen: list[str] = []
            wait_until(lambda: "READY" in (seen.extend(keys()) or seen), timeout=15)
            ws.pipeline(PIPELINE % ("60s", "gated:same"))
            with reaped(_reload(ws)) as reload:
                wait_until(lambda: processes_titled(f"procd: {ws.name} reload check"))
                seen.clear()
                # five pings while the check is held: more than a watchdog interval has passed
                wait_until(lambda: (seen.extend(keys()) or seen).count("WATCHDOG") >= 5, timeout=15)
                assert "READY" not in seen and reload.poll() is None
                (ws.path / "gate").touch()
                reload.communicate(timeout=30)
            assert reload.returncode == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    finally:
        receiver.close()


def test_a_reload_check_dies_with_a_sigkilled_supervisor(ws: Workspace) -> None:
    """No orphans: the check child (and the import child under it) must not outlive procd."""
    ws.write("st.py", STAGES)
    ws.write("gated.py", GATED)
    ws.pipeline(PIPELINE % ("60s", "st:same"))
    with reaped(ws.start_ready()) as proc:
        ws.pipeline(PIPELINE % ("60s", "gated:same"))  # its gate never opens
        with reaped(_reload(ws)):
            checks = wait_until(lambda: processes_titled(f"procd: {ws.name} reload check"))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            wait_until(lambda: not processes_titled(f"procd: {ws.name} reload check"), timeout=10)
    assert checks
