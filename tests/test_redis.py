"""The redis backend end to end: real procd daemons sharing one pipeline through a real
redis-server (on a unix socket in the test's directory), with real SIGKILLs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer

from conftest import Workspace, procd_command, read_records, wait_until

STAGES = """
import json, os, time

def produce(count, delay=0.0):
    for n in range(count):
        yield {"n": n}
        if delay:
            time.sleep(delay)

def work(item, delay=0.0):
    if delay:
        time.sleep(delay)
    item["pid"] = os.getpid()
    return item

def poison(item):
    if item["n"] == 7:
        os._exit(9)  # the worker dies on this item, wherever it runs
    return item

class Check:
    def __init__(self, count):
        self.count = count
        self.seen = {}
    def __call__(self, item):
        self.seen[item["n"]] = self.seen.get(item["n"], 0) + 1
    def close(self):
        missing = [n for n in range(self.count) if n not in self.seen]
        print(json.dumps({"missing": len(missing), "first_missing": missing[:10], "got": len(self.seen)}), flush=True)
"""


def pipeline(ws: Workspace, url: str, *, count: int, work: str = "work", delay: float = 0.0, claim: str = "2s") -> Path:
    ws.write("st.py", STAGES)
    options = f"options = {{ delay = {delay} }}" if delay else ""
    return ws.pipeline(
        f"""
        [pipeline]
        name = "{{name}}"
        stop_timeout = "20s"

        [defaults]
        queue = {{ backend = "redis", url = "{url}", claim_after = "{claim}", batch = 20, maxsize = 400 }}

        [stages.produce]
        function = "st:produce"
        options = {{ count = {count} }}

        [stages.work]
        function = "st:{work}"
        inputs = ["produce"]
        processes = 2
        {options}
        restart = {{ policy = "on-failure", max = 50, backoff = "10ms" }}

        [stages.check]
        function = "st:Check"
        inputs = ["work"]
        options = {{ count = {count} }}
        """
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, "--appendonly", "yes", "--appendfsync", "always").start()
    yield server
    server.stop()


def daemon(ws: Workspace, which: str, *extra: str) -> subprocess.Popen[bytes]:
    """A procd daemon of this workspace's pipeline with its own control socket and log."""
    return subprocess.Popen(
        procd_command(
            "run",
            f"{ws.name}.toml",
            "--log-file",
            f"{which}.jsonl",
            "--control",
            str(ws.path / f"{which}.sock"),
            *extra,
        ),
        cwd=ws.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    (line,) = [r["line"] for r in records if r["event"] == "worker_output" and r["stage"] == "check"]
    result: dict[str, Any] = json.loads(line)
    return result


def items_in(records: list[dict[str, Any]], stage: str) -> int:
    return sum(r.get("items_in", 0) for r in records if r["event"] == "worker_exited" and r["stage"] == stage)


def test_one_daemon_delivers_every_item_through_redis_and_leaves_the_streams_empty(
    ws: Workspace, server: RedisServer
) -> None:
    pipeline(ws, server.url, count=3000)
    proc = daemon(ws, "a")
    assert finish(proc) == 0
    records = read_records(ws.path / "a.jsonl")
    assert summary(records) == {"missing": 0, "first_missing": [], "got": 3000}
    left = subprocess.run(
        ["redis-cli", "-s", str(server.socket), "--scan", "--pattern", f"procd:{ws.name}:*"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.split()
    for key in left:
        if key.endswith((":work", ":check")):
            length = subprocess.run(
                ["redis-cli", "-s", str(server.socket), "XLEN", key], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            assert length == "0", f"{key} still holds {length} entries"


def test_two_daemons_split_the_work_and_together_deliver_every_item(ws: Workspace, server: RedisServer) -> None:
    pipeline(ws, server.url, count=2000, delay=0.002)
    a = daemon(ws, "a")  # every stage
    b = daemon(ws, "b", "--stages", "work")  # a second host for the middle stage
    assert finish(a) == 0
    assert finish(b) == 0
    ra, rb = read_records(ws.path / "a.jsonl"), read_records(ws.path / "b.jsonl")
    assert summary(ra)["missing"] == 0
    assert items_in(ra, "work") > 0 and items_in(rb, "work") > 0, "both daemons should have worked"
    assert items_in(ra, "work") + items_in(rb, "work") >= 2000
    assert not [r for r in rb if r.get("stage") in ("produce", "check")]  # b ran only its stage


def test_a_host_that_starts_first_in_the_next_run_waits_for_that_run_s_writers(
    ws: Workspace, server: RedisServer
) -> None:
    """The end an earlier run left in Redis (kept ``claim_after`` for its late readers) does not
    end the input of a daemon that starts after it: its workers wait for this run's writers."""
    pipeline(ws, server.url, count=2000, delay=0.002)
    first = [daemon(ws, "a"), daemon(ws, "b", "--stages", "work")]
    assert [finish(proc) for proc in first] == [0, 0]
    b = daemon(ws, "b2", "--stages", "work")  # this time the reading host is up first
    try:
        wait_until(lambda: any(r["event"] == "pipeline_ready" for r in read_records(ws.path / "b2.jsonl")), timeout=30)
    except BaseException:
        finish(b, timeout=0.1)
        raise
    a = daemon(ws, "a2")
    assert finish(a) == 0
    assert finish(b) == 0
    ra, rb = read_records(ws.path / "a2.jsonl"), read_records(ws.path / "b2.jsonl")
    assert summary(ra)["missing"] == 0
    assert items_in(rb, "work") > 0, "the host that started first ended at once, on the earlier run's end"


def test_a_daemon_killed_mid_run_loses_nothing_the_other_takes_its_entries(ws: Workspace, server: RedisServer) -> None:
    pipeline(ws, server.url, count=1500, delay=0.01, claim="2s")
    a = daemon(ws, "a")
    b = daemon(ws, "b", "--stages", "work")
    try:
        wait_until(lambda: items_in_flight(ws.path / "b.jsonl"), timeout=20)
        # one consumer per worker process, named host:pid:stage:index
        names = wait_until(lambda: len(found := consumers(server, f"procd:{ws.name}:work", "work")) >= 2 and found)
        assert all(re.fullmatch(r"[^:]+:\d+:work:[01]", name) for name in names), names
        b.send_signal(signal.SIGKILL)  # its workers die with it (PDEATHSIG), holding entries
        b.wait(timeout=10)
        assert finish(a, timeout=90) == 0
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert summary(read_records(ws.path / "a.jsonl"))["missing"] == 0


def test_redis_killed_and_restarted_mid_run_the_pipeline_resumes_and_loses_nothing(
    ws: Workspace, server: RedisServer
) -> None:
    pipeline(ws, server.url, count=1500, delay=0.005)
    a = daemon(ws, "a")
    try:
        wait_until(lambda: any(r["event"] == "pipeline_ready" for r in read_records(ws.path / "a.jsonl")), 20)
        server.kill()  # SIGKILL: what is acknowledged is on disk (appendfsync always)
        wait_until(lambda: any(r["event"] == "transport_unavailable" for r in read_records(ws.path / "a.jsonl")), 20)
        status = subprocess.run(
            procd_command("status", "--control", str(ws.path / "a.sock")), capture_output=True, text=True, timeout=20
        )
        assert "cannot be reached" in status.stdout, status.stdout + status.stderr
        server.start()
        assert finish(a, timeout=90) == 0
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    records = read_records(ws.path / "a.jsonl")
    assert summary(records)["missing"] == 0
    assert [r for r in records if r["event"] == "transport_restored"]


def test_a_poison_entry_is_dead_lettered_across_two_daemons(ws: Workspace, server: RedisServer) -> None:
    pipeline(ws, server.url, count=100, work="poison", claim="1s")
    a = daemon(ws, "a")
    b = daemon(ws, "b", "--stages", "work")
    assert finish(a, timeout=90) == 0
    assert finish(b, timeout=90) == 0
    letters = [
        r for log in ("a.jsonl", "b.jsonl") for r in read_records(ws.path / log) if r["event"] == "item_dead_lettered"
    ]
    assert len(letters) == 1 and letters[0]["item"] == {"n": 7}
    assert summary(read_records(ws.path / "a.jsonl"))["got"] == 99


def consumers(server: RedisServer, stream: str, group: str) -> list[str]:
    """The consumer names of ``group`` on ``stream``, as redis-cli lists them."""
    listed = subprocess.run(
        ["redis-cli", "-s", str(server.socket), "XINFO", "CONSUMERS", stream, group],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.splitlines()
    return [listed[i + 1] for i, line in enumerate(listed[:-1]) if line == "name"]


def items_in_flight(log: Path) -> bool:
    """b's workers are running (and so hold entries)."""
    return sum(1 for r in read_records(log) if r["event"] == "worker_spawned") >= 2 and os.path.exists(log)


def test_stages_on_another_host_need_redis_queues_between_them(ws: Workspace) -> None:
    ws.write("st.py", STAGES)
    ws.pipeline(
        """
        [stages.produce]
        function = "st:produce"
        options = { count = 3 }
        [stages.work]
        function = "st:work"
        inputs = ["produce"]
        [stages.check]
        function = "st:Check"
        inputs = ["work"]
        options = { count = 3 }
        """
    )
    result = ws.run("run", f"{ws.name}.toml", "--stages", "work,chek")
    assert result.code == 78
    lines = result.stderr.splitlines()
    assert f'{ws.name}.toml: --stages: unknown stage "chek"; did you mean "check"?' in lines
    assert (
        f"{ws.name}.toml: stages.work.queue.backend: produce does not run on this host (--stages) but work does, "
        'so the queue between them (the input of work) must be one both reach: backend = "redis", not "memory"'
    ) in lines
    assert any(line.startswith(f"{ws.name}.toml: stages.check.queue.backend: check does not run") for line in lines)


def test_the_password_stays_out_of_records_show_and_status(ws: Workspace, tmp_path: Path) -> None:
    secret = "s3cr3t-pw-9f"
    directory = tmp_path / "rs"
    directory.mkdir()
    server = RedisServer(directory, "--requirepass", secret).start()
    try:
        url = f"unix://:{secret}@{server.socket}"
        pipeline(ws, url, count=200)
        shown = ws.run("show", f"{ws.name}.toml")
        assert shown.code == 0 and secret not in shown.stdout and ":***@" in shown.stdout
        proc = daemon(ws, "a")
        assert finish(proc) == 0
        log = (ws.path / "a.jsonl").read_text()
        assert secret not in log
        assert summary(read_records(ws.path / "a.jsonl"))["missing"] == 0
        # the wrong password: one clear line, exit 1, nothing started
        pipeline(ws, f"unix://:wrong@{server.socket}", count=10)
        wrong = daemon(ws, "w")
        assert finish(wrong) == 1
        records = read_records(ws.path / "w.jsonl")
        failed = [r for r in records if r["event"] == "transport_unavailable"]
        assert failed and "refused the login" in failed[0]["error"] and "wrong" not in json.dumps(records)
        assert not [r for r in records if r["event"] == "worker_spawned"]
    finally:
        server.stop()


def test_a_url_that_cannot_be_parsed_is_a_config_error(ws: Workspace) -> None:
    pipeline(ws, "redis://localhost:notaport/0", count=1)
    result = ws.run("check", f"{ws.name}.toml")
    assert result.code == 78
    assert "stages.work.queue.url: cannot be parsed" in result.stderr
