"""The Prometheus endpoint of a real daemon, scraped over loopback."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request

import pytest

from conftest import Workspace, wait_until

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


def test_metrics_endpoint(ws: Workspace) -> None:
    port = _free_port()
    ws.write("st.py", STAGES)
    ws.pipeline(
        f'[pipeline]\nname = "{ws.name}"\nmetrics = "{port}"\n'
        '[stages.ticks]\nfunction = "st:ticks"\n'
        '[stages.same]\nfunction = "st:same"\ninputs = ["ticks"]\nprocesses = 2\n'
    )
    proc = ws.start_ready()
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
