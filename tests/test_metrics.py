"""The Prometheus endpoint of a real daemon, scraped over loopback."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
import traceback
import urllib.error
import urllib.request

import pytest

from conftest import Workspace, processes_titled, read_records, wait_until
from procd.ops.metrics import MAX_SCRAPERS

STAGES = """
import itertools, time
def ticks():
    for n in itertools.count():
        yield n
        time.sleep(0.001)
def same(n):
    return n
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _start(ws: Workspace) -> tuple[int, subprocess.Popen[str]]:
    """A running pipeline serving metrics on a free port: ticks -> same x2."""
    port = _free_port()
    ws.write("st.py", STAGES)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nmetrics = "{port}"\n'
        '[stages.ticks]\nfunction = "st:ticks"\n'
        '[stages.same]\nfunction = "st:same"\ninputs = ["ticks"]\nprocesses = 2\n'
    )
    return port, ws.start_ready()


def test_metrics_endpoint(ws: Workspace) -> None:
    port, proc = _start(ws)
    try:

        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                return _samples(response.read().decode())

        labels = f'pipeline="{ws.name}",stage="same"'
        first = scrape()
        assert first[f'procd_up{{pipeline="{ws.name}"}}'] == 1
        assert first[f"procd_stage_processes{{{labels}}}"] == 2
        assert first[f"procd_stage_restarts_total{{{labels}}}"] == 0
        assert f"procd_stage_queue_depth_batches{{{labels}}}" in first
        later = wait_until(lambda: (s := scrape())[f"procd_stage_items_in_total{{{labels}}}"] > 0 and s, timeout=10)
        assert later[f"procd_stage_items_out_total{{{labels}}}"] > 0
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert missing.value.code == 404
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"x" * 9000)  # no request head, too long: dropped, the daemon carries on
            assert raw.recv(100) == b""
        assert scrape()[f'procd_up{{pipeline="{ws.name}"}}'] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_bad_metrics_address_is_a_config_error(ws: Workspace) -> None:
    ws.pipeline('[pipeline]\nmetrics = "localhost:http"\n[stages.a]\ncommand = ["true"]\n')
    result = ws.run("check", f"{ws.name}.toml")
    assert result.code == 78
    assert result.stderr == (
        f'{ws.name}.toml: pipeline.metrics: expected "HOST:PORT" or "PORT" with an IP address (or localhost) '
        'and a port from 1024 to 65535, such as "127.0.0.1:9464", got "localhost:http" (str)\n'
    )


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_connections_cannot_starve_the_supervisor(ws: Workspace) -> None:
    port, proc = _start(ws)
    idle: list[socket.socket] = []
    try:
        baseline = len(os.listdir(f"/proc/{proc.pid}/fd"))
        for _ in range(300):  # idle loopback connections that never send a request
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            idle.append(sock)
        wait_until(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) >= baseline + 8)
        # at most MAX_SCRAPERS of them hold a descriptor of the supervisor's; the rest wait
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) <= baseline + MAX_SCRAPERS
        before = _cpu_s(proc.pid)
        time.sleep(1.0)  # measuring: the loop must not spin while it cannot accept
        assert _cpu_s(proc.pid) - before < 0.5
        # a killed worker is restarted, the control socket answers, and a scrape gets through
        # once the idle connections ahead of it have been dropped
        victim = next(pid for pid, title in processes_titled(f"procd: {ws.name}/same[").items())
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: any(
                r["event"] == "worker_spawned" and r["stage"] == "same" and r["generation"] == 2
                for r in read_records(ws.path / "log.jsonl")
            )
        )
        assert ws.run("status", "--control", str(ws.control)).code == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            assert f'procd_up{{pipeline="{ws.name}"}} 1' in response.read().decode()
        records = read_records(ws.path / "log.jsonl")
        assert not [r for r in records if r["event"] == "spawn_failed"]
        assert [r for r in records if r["event"] == "connection_dropped" and r["endpoint"] == "metrics"]
    finally:
        for sock in idle:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_listener_keeps_descriptors_in_reserve_and_pauses_instead_of_spinning() -> None:
    from procd.ops.connections import PAUSE_S, RESERVE_FDS, Listener

    pid = os.fork()
    if pid == 0:  # in a child: the descriptor limit changes
        code = 1
        try:
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(64)
            listener = Listener(server, max_connections=1000)
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(highest)]  # no hole below
            highest = max(fillers)
            limit = highest + 1 + RESERVE_FDS + 10  # room for about 10 connections (and the peers' ends)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            peers = [socket.create_connection(server.getsockname()) for _ in range(4)]
            taken = [listener.take(now=100.0) for _ in range(4)]
            more = [socket.create_connection(server.getsockname()) for _ in range(8)]
            taken += [listener.take(now=100.0) for _ in range(8)]
            accepted = [c for c in taken if c is not None]
            assert 0 < len(accepted) < 12, len(accepted)
            assert all(c.fileno() < limit - RESERVE_FDS for c in accepted)
            # paused: not watched, and nothing taken, until PAUSE_S has passed
            assert listener.paused_until == 100.0 + PAUSE_S and not listener.accepting(100.5)
            assert listener.take(now=100.5) is None and listener.accepting(100.0 + PAUSE_S)
            for sock in accepted + peers + more:
                sock.close()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_stage_totals_never_go_backwards_across_scale_restart_and_reload(ws: Workspace) -> None:
    port = _free_port()
    ws.write("st.py", STAGES)
    text = (
        f'[pipeline]\nname = "{ws.name}"\nmetrics = "{port}"\n'
        '[stages.ticks]\nfunction = "st:ticks"\n'
        '[stages.same]\nfunction = "st:same"\ninputs = ["ticks"]\nprocesses = 4\nqueue = { batch = 1 }\n'
    )
    ws.pipeline(text)
    proc = ws.start_ready()
    labels = f'pipeline="{ws.name}",stage="same"'
    seen: list[tuple[float, float]] = []

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            samples = _samples(response.read().decode())
        seen.append(
            (samples[f"procd_stage_items_in_total{{{labels}}}"], samples[f"procd_stage_items_out_total{{{labels}}}"])
        )
        return samples

    def workers() -> list[dict]:
        reply = json.loads(ws.run("status", "--json", "--control", str(ws.control)).stdout)
        return next(s for s in reply["stages"] if s["name"] == "same")["workers"]

    try:
        wait_until(lambda: all(w["items_in"] > 0 for w in workers()), timeout=15)
        scrape()
        assert ws.run("scale", ws.name, "same=1", "--control", str(ws.control)).code == 0
        wait_until(lambda: scrape() and len(workers()) == 1, timeout=15)
        scrape()
        victim = workers()[0]["pid"]
        os.kill(victim, signal.SIGKILL)  # a restart
        wait_until(lambda: scrape() and workers()[0]["generation"] == 2, timeout=15)
        ws.pipeline(text.replace("processes = 4", "processes = 2"))  # a reload replaces the stage
        assert ws.run("reload", "--control", str(ws.control)).code == 0
        wait_until(lambda: scrape() and [w["generation"] for w in workers()] == [3, 1], timeout=15)
        scrape()
        assert seen == sorted(seen), seen  # neither total ever fell
        assert seen[-1][0] >= seen[0][0] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_the_rate_window_in_the_help_is_the_supervisors() -> None:
    from procd.ops import metrics, status

    reply = {"pipeline": "p", "uptime_s": 1, "items_per_s": 5.0, "rate_window_s": 1.0, "stages": []}
    assert f"over the last {status.RATE_WINDOW_S:g}s" in metrics.render(reply)
