"""The control socket with a real daemon: status, stop, scale, bad requests, other users."""

from __future__ import annotations

import ctypes
import json
import os
import socket

from conftest import Workspace, parse_records, read_records, wait_until
from procd import config

STAGES = """
import itertools, time

def endless():
    for n in itertools.count():
        yield n
        time.sleep(0.001)

def finite(count, pause):
    for n in range(count):
        yield n
        if n % 20 == 0:
            time.sleep(pause)

def sleepy():
    while True:
        time.sleep(3600)
        yield None

def slow(n):
    time.sleep(0.01)
    return n

def same(n):
    return n

class Count:
    def __init__(self):
        self.seen = set()
        self.n = 0
    def __call__(self, item):
        self.n += 1
        self.seen.add(item)
    def close(self):
        print("count", self.n, len(self.seen), flush=True)
"""


def _start(ws: Workspace, pipeline: str):
    ws.write("st.py", STAGES)
    ws.pipeline(pipeline)
    return ws.start_ready()


def _ask(ws: Workspace, *args: str):
    return ws.run(*args, "--control", str(ws.control))


def test_status_shows_every_worker_and_blocked_states(ws: Workspace) -> None:
    proc = _start(
        ws,
        '[stages.fast]\nfunction = "st:endless"\n'
        '[stages.slow]\nfunction = "st:slow"\ninputs = ["fast"]\nprocesses = 2\nqueue = { maxsize = 20, batch = 10 }\n'
        '[stages.idle]\nfunction = "st:sleepy"\n'
        '[stages.waiting]\nfunction = "st:same"\ninputs = ["idle"]\n',
    )
    try:

        def status() -> dict:
            result = _ask(ws, "status", "--json")
            assert result.code == 0, result.stderr
            return json.loads(result.stdout)

        def by_stage(reply: dict) -> dict:
            return {s["name"]: s for s in reply["stages"]}

        # the producer outruns its 2 slow readers and waits on their full queue; the reader of a
        # producer that never yields waits on its empty input
        reply = wait_until(
            lambda: (
                (r := status())
                and by_stage(r)["fast"]["workers"][0]["blocked_on"] == "output"
                and by_stage(r)["waiting"]["workers"][0]["blocked_on"] == "input"
                and r
            )
        )
        stages = by_stage(reply)
        assert reply["pipeline"] == ws.name and reply["pid"] == proc.pid and reply["state"] == "running"
        assert [w["index"] for w in stages["slow"]["workers"]] == [0, 1]
        assert stages["fast"]["workers"][0]["state"] == "blocked"
        assert stages["slow"]["queue"]["capacity_batches"] == 2
        assert stages["slow"]["queue"]["depth_batches"] == 2  # full
        for worker in stages["slow"]["workers"]:
            assert worker["generation"] == 1 and worker["restarts"] == 0 and worker["pid"] > 0
        wait_until(lambda: by_stage(status())["slow"]["workers"][0]["items_in"] > 0, timeout=5)
        table = _ask(ws, "status").stdout
        assert table.splitlines()[1].split() == [
            "STAGE",
            "WORKER",
            "PID",
            "STATE",
            "GEN",
            "RESTARTS",
            "UPTIME",
            "IN",
            "OUT",
            "QUEUE",
        ]
        # the depth moves as the readers work; the capacity does not
        assert any(line.split()[:2] == ["slow", "1"] and line.split()[-1].endswith("/2") for line in table.splitlines())
    finally:
        assert _ask(ws, "stop").code == 0
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    records = read_records(ws.path / "log.jsonl")
    assert [r["reason"] for r in records if r["event"] == "stop_requested"] == [
        "stop requested over the control socket"
    ]


def test_scale_up_and_down_keeps_siblings_and_loses_nothing(ws: Workspace) -> None:
    proc = _start(
        ws,
        '[stages.src]\nfunction = "st:finite"\noptions = { count = 4000, pause = 0.01 }\n'
        '[stages.work]\nfunction = "st:same"\ninputs = ["src"]\nprocesses = 2\nqueue = { maxsize = 100, batch = 10 }\n'
        '[stages.count]\nfunction = "st:Count"\ninputs = ["work"]\n',
    )
    log = ws.path / "log.jsonl"

    def work_pids() -> dict[int, int]:
        reply = json.loads(_ask(ws, "status", "--json").stdout)
        (stage,) = [s for s in reply["stages"] if s["name"] == "work"]
        return {w["index"]: w["pid"] for w in stage["workers"] if w["pid"]}

    before = work_pids()
    up = _ask(ws, "scale", ws.name, "work=4")
    assert up.code == 0, up.stderr
    assert up.stdout == "work: 4 processes (started [2, 3], retiring [])\n"
    after_up = wait_until(lambda: len(p := work_pids()) == 4 and p)
    assert {i: after_up[i] for i in before} == before  # siblings kept their pids
    down = _ask(ws, "scale", ws.name, "work=1")
    assert down.stdout == "work: 1 processes (started [], retiring [1, 2, 3])\n"
    wait_until(lambda: list(work_pids()) == [0])
    assert work_pids()[0] == before[0]
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    records = parse_records(log.read_text())
    retired = [r for r in records if r["event"] == "worker_exited" and r["stage"] == "work" and r["worker"] != 0]
    assert sorted(r["worker"] for r in retired) == [1, 2, 3]
    assert all(r["code"] == 0 and r["expected"] for r in retired)
    assert [r["line"] for r in records if r["event"] == "worker_output"] == ["count 4000 4000"]
    scaled = [r for r in records if r["event"] == "stage_scaled"]
    assert [(r["processes_from"], r["processes_to"]) for r in scaled] == [(2, 4), (4, 1)]


def test_bad_requests_get_errors_and_the_daemon_carries_on(ws: Workspace) -> None:
    proc = _start(ws, '[stages.idle]\nfunction = "st:sleepy"\n')
    try:

        def exchange(payload: bytes) -> list[dict]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(ws.control))
                sock.sendall(payload)
                data = b""
                while data.count(b"\n") < payload.count(b"\n") or not data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            return [json.loads(line) for line in data.splitlines()]

        assert exchange(b"not json\n") == [
            {"ok": False, "error": "malformed request: expected one JSON object per line"}
        ]
        assert exchange(b'["status"]\n') == [{"ok": False, "error": 'malformed request: expected {"command": "..."}'}]
        assert exchange(b'{"command": "explode"}\n') == [
            {
                "ok": False,
                "error": 'unknown command "explode"; commands are status, stop, reload, scale, attach, replayed',
            }
        ]
        assert exchange(b'{"command": "scale", "stage": "nope", "processes": 2}\n') == [
            {"ok": False, "error": "unknown stage 'nope'; stages are idle"}
        ]
        assert exchange(b"x" * 70_000) == [{"ok": False, "error": "request longer than 65536 bytes"}]
        two = exchange(b'{"command": "status"}\n{"command": "status"}\n')
        assert [r["ok"] for r in two] == [True, True]
        assert _ask(ws, "scale", ws.name, "idle=0").stderr == (
            f"procd scale: processes must be an integer from 1 to {config.default_max_processes()} "
            "(pipeline.max_processes), got 0\n"
        )
    finally:
        _ask(ws, "stop")
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_client_of_another_user_is_refused(ws: Workspace) -> None:
    proc = _start(ws, '[stages.idle]\nfunction = "st:sleepy"\n')
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_fd)
                libc = ctypes.CDLL(None, use_errno=True)
                os.seteuid(65534)  # SO_PEERCRED reports the effective uid: nobody
                libc.setfsuid(0)  # while file access still passes as root, so connect() works
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(str(ws.control))
                    sock.sendall(b'{"command": "stop"}\n')
                    os.write(write_fd, sock.recv(4096))
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        reply = os.read(read_fd, 4096)
        os.close(read_fd)
        assert os.waitpid(pid, 0)[1] == 0
        assert json.loads(reply) == {"ok": False, "error": "permission denied: not the same user"}
        assert proc.poll() is None  # the stop was not obeyed
        refused = wait_until(
            lambda: [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "control_refused"]
        )
        assert refused[0]["peer_uid"] == 65534
    finally:
        _ask(ws, "stop")
        proc.communicate(timeout=20)


def test_a_second_daemon_for_the_same_socket_is_refused_and_default_path(ws: Workspace) -> None:
    proc = _start(ws, '[stages.idle]\nfunction = "st:sleepy"\n')
    try:
        second = ws.run("run", f"{ws.name}.toml")
        assert second.code == 1
        (record,) = second.events("control_unavailable")
        assert record["error"] == f"another procd is already running with the control socket {ws.control}"
        default = ws.start("run", f"{ws.name}.toml", "--control", f"/run/procd/{ws.name}.sock")
        wait_until(lambda: os.path.exists(f"/run/procd/{ws.name}.sock"))
        assert os.stat("/run/procd").st_mode & 0o777 == 0o700
        assert os.stat(f"/run/procd/{ws.name}.sock").st_mode & 0o777 == 0o600
        status = ws.run("status", ws.name, "--json")  # found by name under /run/procd
        assert status.code == 0 and json.loads(status.stdout)["pid"] == default.pid
        assert ws.run("stop", ws.name).code == 0
        default.communicate(timeout=20)
        assert default.returncode == 0 and not os.path.exists(f"/run/procd/{ws.name}.sock")
    finally:
        _ask(ws, "stop")
        proc.communicate(timeout=20)
    missing = ws.run("status", "no-such-pipeline")
    assert missing.code == 1
    assert (
        missing.stderr
        == "procd status: no pipeline is running with the control socket /run/procd/no-such-pipeline.sock\n"
    )
