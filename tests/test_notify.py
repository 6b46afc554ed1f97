"""sd_notify with a real receiver: an AF_UNIX datagram socket with SO_PASSCRED checks every
message and the pid that sent it."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from conftest import Workspace, read_records, wait_until
from procd.ops.notify import Notifier

STAGES = """
import itertools, time
def ticks():
    for n in itertools.count():
        yield n
        time.sleep(0.001)
def same(n):
    return n
"""

SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>; also SCM_TIMESTAMPNS (Python's socket module lacks both)


class Receiver:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # the kernel stamps each datagram when it arrives, not when the test reads it
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[int, dict[str, str]]] = []
        self.ping_times: list[float] = []

    def drain(self) -> list[tuple[int, dict[str, str]]]:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(16))
            except TimeoutError:
                return self.messages
            pid = next(
                struct.unpack("3i", payload[:12])[0]
                for level, kind, payload in ancdata
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((pid, fields))
            if "WATCHDOG" in fields:
                self.ping_times.append(
                    next(
                        seconds + nanoseconds / 1e9
                        for level, kind, payload in ancdata
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS
                        for seconds, nanoseconds in [struct.unpack("qq", payload[:16])]
                    )
                )

    def pings(self) -> list[float]:
        """When each WATCHDOG=1 arrived (the kernel's stamp, on the real-time clock)."""
        self.drain()
        return self.ping_times

    def sent_keys(self) -> list[str]:
        return [key for _pid, fields in self.drain() for key in fields if key != "STATUS"]


def _start(ws: Workspace, watchdog_usec: int) -> subprocess.Popen[bytes]:
    """``procd run`` of the workspace's pipeline as a service: its notify socket and watchdog set."""
    env = {**os.environ, "NOTIFY_SOCKET": str(ws.path / "notify.sock"), "WATCHDOG_USEC": str(watchdog_usec)}
    argv = [sys.executable, "-m", "procd", "run", f"{ws.name}.toml", "--log-file", "log.jsonl"]
    return subprocess.Popen(
        [*argv, "--control", str(ws.control)],
        cwd=ws.path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_ready_status_watchdog_reloading_stopping(ws: Workspace) -> None:
    receiver = Receiver(ws.path / "notify.sock")
    ws.write("st.py", STAGES)
    ws.pipeline('[stages.ticks]\nfunction = "st:ticks"\n[stages.same]\nfunction = "st:same"\ninputs = ["ticks"]\n')
    proc = _start(ws, watchdog_usec=200_000)
    try:
        wait_until(lambda: "READY" in receiver.sent_keys(), timeout=15)
        ready_at = next(i for i, (_p, f) in enumerate(receiver.messages) if "READY" in f)
        records = read_records(ws.path / "log.jsonl")
        assert any(r["event"] == "pipeline_ready" for r in records)  # READY=1 came after every worker ran
        _pid, ready = receiver.messages[ready_at]
        assert ready["STATUS"].startswith("2 stages, 2/2 workers running, ")
        before = len(receiver.pings())
        # the loop keeps pinging (it is not one ping at start) ...
        wait_until(lambda: len(receiver.pings()) >= before + 5, timeout=15)
        # ... and never faster than every 100 ms (half of WATCHDOG_USEC); a loaded machine can
        # only make the gaps longer, so this bound holds under load (a little slack for select)
        gaps = [b - a for a, b in itertools.pairwise(receiver.pings()[before:])]
        assert min(gaps) >= 0.09, gaps
        statuses = [f["STATUS"] for _p, f in receiver.drain() if "STATUS" in f]
        assert len(statuses) >= 1 and statuses[-1].endswith(" restarts")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any("RELOADING" in f for _p, f in receiver.drain()), timeout=10)
        reloading = next(f for _p, f in receiver.messages if "RELOADING" in f)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        wait_until(lambda: any("READY" in f for _p, f in receiver.drain()[ready_at + 1 :]), timeout=10)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        receiver.drain()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert {pid for pid, _f in receiver.messages} == {proc.pid}  # only the supervisor speaks
    keys = [key for _pid, fields in receiver.messages for key in fields if key not in ("STATUS", "WATCHDOG")]
    assert keys == ["READY", "RELOADING", "MONOTONIC_USEC", "READY", "STOPPING"]


def test_without_notify_socket_nothing_happens_and_children_do_not_inherit_it() -> None:
    environ = {"NOTIFY_SOCKET": "@procd-test", "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(environ)
    assert environ == {}  # removed, so workers never speak for procd
    assert notifier.address == "\0procd-test" and notifier.watchdog_interval_s == 2.5
    assert not Notifier.from_environ({}).enabled
    Notifier.from_environ({}).send(READY=1)  # a no-op, no error
    other = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None  # the watchdog is someone else's


def test_a_service_manager_that_reads_nothing_never_stalls_the_pipeline(ws: Workspace) -> None:
    """The kernel queues a few datagrams per socket (net.unix.max_dgram_qlen, 10 here): a full
    queue must cost messages, never the loop. Found stalled in a blocking sendto, with a stop and a
    reload waiting behind it."""
    receiver = Receiver(ws.path / "notify.sock")
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filled = 0
    while True:  # fill its queue before procd starts: procd's first message finds no room
        try:
            filler.sendto(b"FILLER=1", socket.MSG_DONTWAIT, str(ws.path / "notify.sock"))
        except BlockingIOError:
            break
        filled += 1
    assert filled > 0
    ws.write("st.py", "def numbers():\n    yield from range(1000)\n\ndef sink(n):\n    pass\n")
    ws.pipeline(
        '[stages.numbers]\nfunction = "st:numbers"\n[stages.sink]\nfunction = "st:sink"\ninputs = ["numbers"]\n'
    )
    proc = _start(ws, watchdog_usec=100_000)
    try:
        assert proc.wait(timeout=30) == 0  # a finite pipeline ends by itself, whatever the socket does
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        filler.close()
    records = read_records(ws.path / "log.jsonl")
    assert records[-1]["event"] == "pipeline_stopped" and records[-1]["outcome"] == "finished"
    assert not [r for r in records if r["event"] == "notify_failed"]  # a full queue is not a failure
    # nothing read the socket meanwhile: procd never had room, and ended all the same
    assert [fields for _pid, fields in receiver.drain()] == [{"FILLER": "1"}] * filled


def test_messages_the_queue_has_no_room_for_are_kept_in_order_and_sent_once_it_has(ws: Workspace) -> None:
    receiver = Receiver(ws.path / "notify.sock")
    notifier = Notifier(str(ws.path / "notify.sock"), None)
    sent = 0
    while not notifier.pending:  # fill the queue with procd's own messages
        notifier.send(STATUS=f"filling {sent}")
        sent += 1
    assert notifier.pending == [{"STATUS": f"filling {sent - 1}"}]
    notifier.send(WATCHDOG=1)  # merged: a later status and ping say all the earlier ones did
    notifier.send(READY=1, STATUS="ready")
    notifier.send(STATUS="later")
    assert notifier.pending == [
        {"STATUS": f"filling {sent - 1}", "WATCHDOG": 1},
        {"READY": 1, "STATUS": "ready"},
        {"STATUS": "later"},
    ]
    receiver.drain()  # room again
    assert notifier.flush() and notifier.pending == []
    tail = [fields for _pid, fields in receiver.drain()][-3:]
    assert tail == [
        {"STATUS": f"filling {sent - 1}", "WATCHDOG": "1"},
        {"READY": "1", "STATUS": "ready"},
        {"STATUS": "later"},
    ]
    notifier.close()


def test_a_refused_message_does_not_hold_back_those_after_it(ws: Workspace) -> None:
    receiver = Receiver(ws.path / "notify.sock")
    notifier = Notifier(str(ws.path / "notify.sock"), None)
    while not notifier.pending:  # fill the queue, so that the next messages are kept
        notifier.send(STATUS="filling")
    notifier.send(READY=1)
    receiver.drain()
    receiver.sock.close()
    (ws.path / "notify.sock").unlink()  # the service manager is gone: the first kept one is refused
    with contextlib.suppress(OSError):
        notifier.flush()
    assert notifier.pending == [{"READY": 1}]  # the refused one went; the next keeps its turn
    receiver = Receiver(ws.path / "notify.sock")  # and is sent once there is someone to take it
    assert notifier.flush() and notifier.pending == []
    assert [fields for _pid, fields in receiver.drain()] == [{"READY": "1"}]
    notifier.close()


def _filled(ws: Workspace) -> tuple[Receiver, Notifier]:
    """A receiver whose queue procd's own messages have filled: the next ones are kept."""
    receiver = Receiver(ws.path / "notify.sock")
    notifier = Notifier(str(ws.path / "notify.sock"), None)
    while not notifier.pending:
        notifier.send(STATUS="filling")
    return receiver, notifier


def _received_once_flushed(receiver: Receiver, notifier: Notifier) -> list[dict[str, str]]:
    """What the receiver gets once it reads again, until nothing is kept."""
    before = len(receiver.drain())
    while not notifier.flush():
        receiver.drain()
    return [fields for _pid, fields in receiver.drain()[before:]]


def test_extend_timeout_messages_kept_while_the_queue_is_full_are_merged(ws: Workspace) -> None:
    # a long environment build sends one every few seconds: the latest says all the earlier did
    receiver, notifier = _filled(ws)
    for n in range(1, 100):
        notifier.send(EXTEND_TIMEOUT_USEC=n * 1_000_000, STATUS="building the pipeline's environment")
        notifier.send(WATCHDOG=1)
    assert notifier.pending == [
        {"STATUS": "building the pipeline's environment", "EXTEND_TIMEOUT_USEC": 99_000_000, "WATCHDOG": 1}
    ]
    assert _received_once_flushed(receiver, notifier) == [
        {"STATUS": "building the pipeline's environment", "EXTEND_TIMEOUT_USEC": "99000000", "WATCHDOG": "1"}
    ]
    notifier.close()


def test_ready_and_stopping_are_never_dropped_however_many_messages_are_kept(ws: Workspace) -> None:
    # 40 reloads while the service manager reads nothing: 83 messages, more than are kept (64)
    receiver, notifier = _filled(ws)
    notifier.send(READY=1, STATUS="ready")
    for n in range(40):
        notifier.reloading()
        notifier.send(READY=1, STATUS=f"reloaded {n}")
        notifier.send(WATCHDOG=1)
    notifier.send(STOPPING=1, STATUS="stopping")
    assert len(notifier.pending) <= 64
    received = _received_once_flushed(receiver, notifier)
    # every READY=1 and the STOPPING=1 arrive, in order; the oldest RELOADING=1 went first
    assert [f["STATUS"] for f in received if "READY" in f] == ["ready"] + [f"reloaded {n}" for n in range(40)]
    assert (received[-1]["STOPPING"], received[-1]["STATUS"]) == ("1", "stopping")  # a ping may be folded in
    reloads = [f for f in received if "RELOADING" in f]
    assert 0 < len(reloads) < 40
    stamps = [int(f["MONOTONIC_USEC"]) for f in reloads]
    assert stamps == sorted(stamps)  # the latest were kept, in order
    last_ready = max(i for i, f in enumerate(received) if "READY" in f)
    assert received.index(reloads[-1]) < last_ready  # the last reload's, before its READY=1
    # nothing but READY=1: each says all an earlier one did, so two in a row become one
    for n in range(100):
        notifier.send(READY=1, STATUS=f"ready {n}")
    notifier.send(STOPPING=1)
    assert len(notifier.pending) <= 64
    assert notifier.pending[-2] == {"READY": 1, "STATUS": "ready 99"} and notifier.pending[-1] == {"STOPPING": 1}
    notifier.close()


def test_a_reload_under_way_keeps_its_reloading_message_however_many_are_kept(ws: Workspace) -> None:
    # RELOADING=1 may make room only once its READY=1 is kept after it: a reload still under
    # way must be heard (two READY=1 in a row merge instead)
    receiver, notifier = _filled(ws)
    for n in range(63):
        notifier.send(READY=1, STATUS=f"ready {n}")
    notifier.reloading()
    notifier.send(STATUS="reloading")
    assert len(notifier.pending) <= 64
    received = _received_once_flushed(receiver, notifier)
    assert [f["STATUS"] for f in received if "READY" in f][-1] == "ready 62"
    assert "RELOADING" in received[-2] and received[-1]["STATUS"] == "reloading"
    notifier.close()
