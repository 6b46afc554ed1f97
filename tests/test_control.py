"""The control socket with a real daemon: status, stop, scale, bad requests, other users."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from conftest import Workspace, parse_records, read_records, wait_until
from procd import cli, config

STAGES = """
import itertools, os, time

def endless():
    for n in itertools.count():
        yield n
        time.sleep(0.001)

def finite(count, pause, until=None):
    for n in range(count):
        yield n
        if n % 20 == 0:
            time.sleep(pause)
    deadline = time.monotonic() + 60
    while until and not os.path.exists(until) and time.monotonic() < deadline:
        time.sleep(0.01)  # the test says when the input may end

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
                # one snapshot in which the queue is full too (a reader may take a batch between
                # the producer blocking and the status being read)
                and by_stage(r)["slow"]["queue"]["depth_batches"] == 2
                and r
            )
        )
        stages = by_stage(reply)
        assert reply["pipeline"] == ws.name and reply["pid"] == proc.pid and reply["state"] == "running"
        assert [w["index"] for w in stages["slow"]["workers"]] == [0, 1]
        assert stages["fast"]["workers"][0]["state"] == "blocked"
        assert stages["slow"]["queue"]["capacity_batches"] == 2
        for worker in stages["slow"]["workers"]:
            assert worker["generation"] == 1 and worker["restarts"] == 0 and worker["pid"] > 0
        wait_until(lambda: by_stage(status())["slow"]["workers"][0]["items_in"] > 0, timeout=5)
        table = _ask(ws, "status").stdout
        assert re.fullmatch(
            rf"pipeline {ws.name}  pid {proc.pid}  running  up [\d.]+s  [\d,]+ items/s into the sinks \(last \d+s\)",
            table.splitlines()[0],
        )
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
        '[stages.src]\nfunction = "st:finite"\noptions = { count = 4000, pause = 0.01, until = "release" }\n'
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
    remaining = wait_until(lambda: list(p := work_pids()) == [0] and p)
    assert remaining[0] == before[0]
    (ws.path / "release").touch()  # the pipeline may end now: its input ends
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
        # the command table checks every field: none missing, none unknown, each of its type
        assert exchange(b'{"command": "scale", "stage": "idle"}\n') == [
            {"ok": False, "error": 'scale needs "processes" (an integer)'}
        ]
        assert exchange(b'{"command": "scale", "stage": "idle", "processes": "2"}\n') == [
            {"ok": False, "error": "scale: \"processes\" must be an integer, got '2'"}
        ]
        assert exchange(b'{"command": "status", "verbose": true}\n') == [
            {"ok": False, "error": 'unknown field "verbose" for status; it takes no fields'}
        ]
        # nesting deeper than the JSON parser's recursion limit killed the supervisor
        assert exchange(b"[" * 60_000 + b"\n") == [
            {"ok": False, "error": "malformed request: expected one JSON object per line"}
        ]
        assert exchange(b'{"command": ' + b"[" * 60_000 + b"\n") == [
            {"ok": False, "error": "malformed request: expected one JSON object per line"}
        ]
        assert exchange(b"\xff\xfe\n") == [
            {"ok": False, "error": "malformed request: expected one JSON object per line"}
        ]
        assert exchange(b"x" * 70_000) == [{"ok": False, "error": "request longer than 65536 bytes"}]
        two = exchange(b'{"command": "status"}\n{"command": "status"}\n')
        assert [r["ok"] for r in two] == [True, True]
        assert _ask(ws, "scale", ws.name, "idle=0").stderr == (
            f"procd scale: processes must be an integer from 1 to {config.default_max_processes()} "
            "(pipeline.max_processes), got 0\n"
        )
        assert proc.poll() is None
    finally:
        _ask(ws, "stop")
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert not [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "control_failed"]


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
                    try:
                        sock.sendall(b'{"command": "stop"}\n')
                    except BrokenPipeError:
                        pass  # refused before the request went: the reply waits all the same
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
    assert missing.stderr == (
        "procd status: no pipeline named no-such-pipeline is running (looked for no-such-pipeline.sock in /run/procd)\n"
    )


def test_the_command_table_is_the_one_source_of_verbs_and_requests() -> None:
    from procd import cli
    from procd.ops import commands, control

    verbs = {name for name, command in commands.COMMANDS.items() if command.verb}
    assert verbs == set(cli._VERBS) == {"status", "stop", "reload", "scale"}
    parser_verbs = set(cli._parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert verbs <= parser_verbs
    assert commands.encode("scale", stage="a", processes=2) == b'{"command": "scale", "stage": "a", "processes": 2}\n'
    for name, args, error in (
        ("explode", {}, 'unknown command "explode"; commands are status, stop, reload, scale, attach, replayed'),
        ("scale", {"stage": "a"}, 'scale needs "processes" (an integer)'),
        ("scale", {"stage": "a", "processes": True}, 'scale: "processes" must be an integer, got True'),
    ):
        try:
            commands.encode(name, **args)
        except commands.ControlError as exc:
            assert str(exc) == error
        else:
            raise AssertionError(f"{name} {args} was encoded")
    assert isinstance(control.parse(b'{"command": "reload"}'), control.Request)
    try:
        control.check_handlers({"status": lambda _r: {}})
    except ValueError as exc:
        assert "missing ['attach', 'reload', 'replayed', 'scale', 'stop']" in str(exc)
    else:
        raise AssertionError("a handler table without most commands was accepted")


def test_stop_ends_with_outcome_stopped_and_exit_0(ws: Workspace) -> None:
    proc = _start(ws, '[stages.idle]\nfunction = "st:sleepy"\n')
    stopped = _ask(ws, "stop")
    assert stopped.code == 0 and stopped.stdout == ""
    proc.communicate(timeout=20)
    assert proc.returncode == 0
    (record,) = [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "pipeline_stopped"]
    assert record["outcome"] == "stopped" and record["exit_code"] == 0
    assert record["stop_reason"] == "stop requested over the control socket"


def test_a_client_that_never_reads_is_dropped_and_others_are_served(ws: Workspace) -> None:
    proc = _start(ws, '[stages.idle]\nfunction = "st:sleepy"\n')
    try:
        greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.connect(str(ws.control))
        greedy.setblocking(False)
        request = b'{"command": "status"}\n'
        sent = 0
        for _ in range(200_000):  # until the supervisor stops taking requests: its outbox is full
            try:
                sent += greedy.send(request * 100)
            except BlockingIOError:
                break
        assert sent < 200_000 * 100 * len(request)
        # the supervisor stays free for everyone else meanwhile
        status = _ask(ws, "status", "--json")
        assert status.code == 0 and json.loads(status.stdout)["pid"] == proc.pid
        dropped = wait_until(
            lambda: [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "connection_dropped"],
            timeout=20,
        )
        assert dropped[0]["endpoint"] == "control" and 0 < dropped[0]["unsent_bytes"] < 1024 * 1024
        greedy.setblocking(True)
        greedy.settimeout(10)
        while greedy.recv(1 << 20):  # what was sent, then the end: the supervisor closed it
            pass
        greedy.close()
        assert _ask(ws, "status").code == 0
    finally:
        _ask(ws, "stop")
        proc.communicate(timeout=20)
    assert proc.returncode == 0


VICTIM, ATTACKER = 65533, 65534  # two real uids other than ours (root)
VICTIM_DIR = f"/tmp/procd-{VICTIM}"  # the victim has no XDG_RUNTIME_DIR


def _import_what_run_imports() -> None:
    """``cli.main`` imports what a command needs when it runs it; as the victim's uid it could
    not read the interpreter's files, so the modules of ``procd run`` are imported here first."""
    import structlog  # noqa: F401  (procd.log imports it only when it builds a logger)

    import procd.log
    import procd.ops.notify
    import procd.supervisor.core  # noqa: F401


def _victim(argv: list[str], cwd: str, output: tuple[int, int] | None = None) -> int:
    """Fork a child that runs ``procd ARGV`` in-process as the victim's uid (its interpreter
    under /root is out of that uid's reach), stdout and stderr to ``output`` (else /dev/null);
    return its pid."""
    _import_what_run_imports()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            out, err = output or (os.open(os.devnull, os.O_WRONLY),) * 2
            os.dup2(out, 1)
            os.dup2(err, 2)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
            for name in ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
                os.environ.pop(name, None)
            os.setgroups([])
            os.setresgid(VICTIM, VICTIM, VICTIM)
            os.setresuid(VICTIM, VICTIM, VICTIM)
            os.chdir(cwd)
            code = cli.main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def _as_victim(*argv: str, cwd: str) -> subprocess.CompletedProcess[str]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = _victim(list(argv), cwd, (out_w, err_w))
    os.close(out_w)
    os.close(err_w)
    with open(out_r) as out, open(err_r) as err:
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return subprocess.CompletedProcess(list(argv), code, stdout, stderr)


def _as_attacker(work: Callable[[], None]) -> int:
    """Fork a child that runs ``work`` as the attacker's uid; return its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(ATTACKER, ATTACKER, ATTACKER)
            os.setresuid(ATTACKER, ATTACKER, ATTACKER)
            os.umask(0)
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def _world_readable_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="procd-victim-"))
    path.chmod(0o755)
    return path


def test_another_user_cannot_take_the_control_directory(ws: Workspace) -> None:
    shutil.rmtree(VICTIM_DIR, ignore_errors=True)
    home = _world_readable_dir()
    try:
        (home / "v.toml").write_text('[pipeline]\nname = "v"\n[stages.idle]\ncommand = ["sleep", "3600"]\n')
        (home / "v.toml").chmod(0o644)

        pid = _as_attacker(lambda: os.mkdir(VICTIM_DIR, 0o777))  # made first, open to all
        assert os.waitpid(pid, 0)[1] == 0
        refused = _as_victim("run", "v.toml", cwd=str(home))
        assert refused.returncode == 1
        (record,) = [r for r in parse_records(refused.stderr) if r["event"] == "control_unavailable"]
        assert record["error"] == (
            f"refusing the control directory {VICTIM_DIR}: it belongs to uid {ATTACKER}, not to uid {VICTIM}; "
            "another user may have made it. Remove it, or choose another place with --control."
        )
        os.rmdir(VICTIM_DIR)

        pid = _as_attacker(lambda: Path(VICTIM_DIR).write_text("x"))  # a plain file in its place
        assert os.waitpid(pid, 0)[1] == 0
        refused = _as_victim("run", "v.toml", cwd=str(home))
        (record,) = [r for r in parse_records(refused.stderr) if r["event"] == "control_unavailable"]
        assert record["error"].startswith(f"refusing the control directory {VICTIM_DIR}: it is not a directory;")
        os.unlink(VICTIM_DIR)

        # with the place free, the victim's procd makes it: its own, 0700
        victim = _victim(["run", "v.toml"], str(home))
        try:
            wait_until(lambda: os.path.exists(f"{VICTIM_DIR}/v.sock"))
            info = os.lstat(VICTIM_DIR)
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (VICTIM, 0o700)
            assert _as_victim("status", cwd=str(home)).returncode == 0  # found in /tmp/procd-UID
            assert _as_victim("stop", "v", cwd=str(home)).returncode == 0
        finally:
            if _as_victim("status", "v", cwd=str(home)).returncode == 0:
                _as_victim("stop", "v", cwd=str(home))
            assert os.waitstatus_to_exitcode(os.waitpid(victim, 0)[1]) == 0
    finally:
        shutil.rmtree(home)
        shutil.rmtree(VICTIM_DIR, ignore_errors=True)


def test_a_client_does_not_believe_a_server_of_another_user(ws: Workspace) -> None:
    shutil.rmtree(VICTIM_DIR, ignore_errors=True)
    ready_r, ready_w = os.pipe()

    def forge() -> None:  # the attacker's stand-in for the victim's pipeline "v"
        os.mkdir(VICTIM_DIR, 0o777)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(f"{VICTIM_DIR}/v.sock")
            server.listen(8)
            os.write(ready_w, b"1")
            while True:
                conn, _ = server.accept()
                try:
                    conn.sendall(b'{"ok": true, "stopping": true, "pipeline": "v", "pid": 1, "state": "running"}\n')
                except OSError:
                    pass  # a probe that has gone
                conn.close()

    attacker = _as_attacker(forge)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        for verb in ("stop", "status"):
            result = _as_victim(verb, "v", cwd="/")
            assert result.returncode == 1 and result.stdout == ""
            assert re.fullmatch(
                rf"procd {verb}: refusing {VICTIM_DIR}/v.sock: the process answering there \(pid {attacker}\) runs "
                rf"as uid {ATTACKER}, not as uid {VICTIM} or root; another user may have taken the place of the "
                r"pipeline's control socket\n",
                result.stderr,
            ), result.stderr
    finally:
        os.close(ready_r)
        os.kill(attacker, signal.SIGKILL)
        os.waitpid(attacker, 0)
        shutil.rmtree(VICTIM_DIR, ignore_errors=True)


def test_under_systemd_the_socket_is_in_runtime_directory(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline('[stages.idle]\nfunction = "st:sleepy"\n')
    runtime = ws.path / "runtime"
    env = {**os.environ, "RUNTIME_DIRECTORY": f"{runtime}:{ws.path / 'other'}"}  # systemd's list: the first
    proc = subprocess.Popen(
        [sys.executable, "-m", "procd", "run", f"{ws.name}.toml", "--log-file", "log.jsonl"],
        cwd=ws.path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: any(r["event"] == "pipeline_ready" for r in read_records(ws.path / "log.jsonl")))
        (starting,) = [r for r in read_records(ws.path / "log.jsonl") if r["event"] == "pipeline_starting"]
        assert starting["control"] == str(runtime / f"{ws.name}.sock")
        assert stat.S_IMODE(os.lstat(runtime).st_mode) == 0o700
        status = subprocess.run(
            [sys.executable, "-m", "procd", "status", ws.name, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0 and json.loads(status.stdout)["pid"] == proc.pid
        elsewhere = ws.run("status", ws.name)  # without the variable: not found, and says where it looked
        assert elsewhere.code == 1
        assert elsewhere.stderr == (
            f"procd status: no pipeline named {ws.name} is running (looked for {ws.name}.sock in /run/procd)\n"
        )
    finally:
        subprocess.run(
            [sys.executable, "-m", "procd", "stop", ws.name], env=env, capture_output=True, timeout=30, check=False
        )
        proc.wait(timeout=20)
    assert proc.returncode == 0


def test_a_handler_that_fails_is_answered_and_logged_never_fatal(ws: Workspace) -> None:
    import io

    from procd import config
    from procd.log import open_logger
    from procd.ops import control
    from procd.supervisor.core import Supervisor

    ws.pipeline('[stages.a]\ncommand = ["true"]\n')
    spec = config.load_pipeline(str(ws.path / f"{ws.name}.toml"))
    stream = io.StringIO()
    log, writer = open_logger(spec.name, stream=stream)
    try:
        supervisor = Supervisor(spec, log, writer, control_path=str(ws.control))

        def broken(_request: control.Request) -> control.Answer:
            raise ZeroDivisionError("division by zero")

        supervisor.operations.handlers["status"] = broken
        reply = supervisor.operations.answer(control.parse(b'{"command": "status"}'))
        assert reply == {"ok": False, "error": "procd failed to answer status: ZeroDivisionError('division by zero')"}
        (record,) = [r for r in parse_records(stream.getvalue()) if r["event"] == "control_failed"]
        assert record["command"] == "status" and record["error"] == "ZeroDivisionError('division by zero')"
        assert record["traceback"].startswith("Traceback") and record["level"] == "error"
        supervisor.loop.close()
    finally:
        writer.close()
