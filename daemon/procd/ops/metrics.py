"""An optional Prometheus endpoint: the pipeline's status in the text exposition format,
served over plain HTTP by the supervisor's own loop (no thread).

The format is a handful of lines (``# HELP``, ``# TYPE``, ``name{labels} value``), so it is
written here rather than pulled in with a client library and its registry. Scrapers are
bounded in number and in idle time (``connections``): idle connections cannot starve the
supervisor of descriptors.
"""

from __future__ import annotations

import socket
from typing import Any

from procd.ops.connections import Connection, Listener

MAX_REQUEST = 8192
MAX_SCRAPERS = 16
SCRAPER_IDLE_S = 5.0  # to send a request head, and to read the answer
_STAGE_METRICS = (
    ("procd_stage_processes", "gauge", "Processes of the stage that are running or starting.", "processes"),
    (
        "procd_stage_items_in_total",
        "counter",
        "Items the stage has taken in, over every process it had (never reset by restart, scale or reload).",
        "items_in",
    ),
    (
        "procd_stage_items_out_total",
        "counter",
        "Items the stage has handed on, over every process it had (never reset by restart, scale or reload).",
        "items_out",
    ),
    ("procd_stage_restarts_total", "counter", "Restarts of the stage's processes.", "restarts"),
    ("procd_stage_dead_letters_total", "counter", "Items the stage gave up on.", "dead_letters"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(status: dict[str, Any]) -> str:
    """The exposition of one ``status()`` reply (``supervisor.operations``)."""
    pipeline = _label(status["pipeline"])
    lines = [
        "# HELP procd_up 1 while the supervisor runs.",
        "# TYPE procd_up gauge",
        f'procd_up{{pipeline="{pipeline}"}} 1',
        "# HELP procd_uptime_seconds Seconds since the supervisor started.",
        "# TYPE procd_uptime_seconds gauge",
        f'procd_uptime_seconds{{pipeline="{pipeline}"}} {status["uptime_s"]}',
        # the window is status.RATE_WINDOW_S (a layer above this one; test_metrics keeps them in step)
        "# HELP procd_items_per_second Items taken in by the sinks per second, over the last 10s (or since the start).",
        "# TYPE procd_items_per_second gauge",
        f'procd_items_per_second{{pipeline="{pipeline}"}} {status["items_per_s"]}',
    ]
    for name, kind, help_text, key in _STAGE_METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for stage in status["stages"]:
            lines.append(f'{name}{{pipeline="{pipeline}",stage="{_label(stage["name"])}"}} {stage[key]}')
    lines += [
        "# HELP procd_stage_queue_depth_batches Batches waiting in the stage's input.",
        "# TYPE procd_stage_queue_depth_batches gauge",
    ]
    for stage in status["stages"]:
        queue = stage["queue"]
        if queue is not None and queue["depth_batches"] is not None:
            labels = f'pipeline="{pipeline}",stage="{_label(stage["name"])}"'
            lines.append(f"procd_stage_queue_depth_batches{{{labels}}} {queue['depth_batches']}")
    return "\n".join(lines) + "\n"


class HttpClient(Connection):
    """One connection: reads a request head, answers once, closes."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        # outbox_limit 1: once the answer is queued, nothing more is read
        super().__init__(sock, now, idle_s=SCRAPER_IDLE_S, stall_s=SCRAPER_IDLE_S, outbox_limit=1)

    def read_request(self, now: float) -> str | None:
        """The request path once the head is complete; "" while incomplete; None on EOF, an
        error or a head longer than ``MAX_REQUEST``."""
        if not self.receive(now):
            return None
        if b"\r\n\r\n" not in self.inbox and b"\n\n" not in self.inbox:
            return None if len(self.inbox) > MAX_REQUEST else ""
        parts = bytes(self.inbox.split(b"\r\n", 1)[0]).split()
        return parts[1].decode(errors="replace") if len(parts) >= 2 and parts[0] == b"GET" else "?"

    def respond(self, path: str, status: dict[str, Any]) -> None:
        if path.split("?")[0] == "/metrics":
            code, body, kind = "200 OK", render(status), "text/plain; version=0.0.4; charset=utf-8"
        else:
            code, body, kind = "404 Not Found", "procd serves /metrics only\n", "text/plain; charset=utf-8"
        data = body.encode()
        head = f"HTTP/1.0 {code}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        self.send(head.encode() + data)
        self.closing = True


class MetricsServer(Listener):
    """The listening TCP socket: at most ``MAX_SCRAPERS`` connections at once."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        super().__init__(sock, max_connections=MAX_SCRAPERS)

    def accept(self, now: float) -> HttpClient | None:
        conn = self.take(now)
        return None if conn is None else HttpClient(conn, now)
