"""``procd top``: a live view of a running pipeline, fed by its control socket.

On a terminal the view is redrawn in place once a second and ``q`` quits; otherwise one snapshot
is printed (two status samples half a second apart, for the rates).
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

Status = dict[str, Any]


def render(before: Status, after: Status, elapsed_s: float) -> str:
    """The view: one row per stage, rates from two status replies ``elapsed_s`` apart."""
    old = {s["name"]: s for s in before["stages"]}
    rows = [("STAGE", "PROCS", "STATES", "IN/s", "OUT/s", "QUEUE", "RESTARTS", "DEAD")]
    for stage in after["stages"]:
        prior = old.get(stage["name"], stage)
        states = Counter(w["state"] for w in stage["workers"])
        queue = stage["queue"]
        rows.append(
            (
                stage["name"],
                str(stage["processes"]),
                ", ".join(f"{state} {n}" for state, n in sorted(states.items())),
                f"{max(0, stage['items_in'] - prior['items_in']) / elapsed_s:,.0f}",
                f"{max(0, stage['items_out'] - prior['items_out']) / elapsed_s:,.0f}",
                "-" if queue is None else f"{queue['depth_batches']}/{queue['capacity_batches']}",
                str(stage["restarts"]),
                str(stage["dead_letters"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"procd top — {after['pipeline']}  pid {after['pid']}  {after['state']}  up {after['uptime_s']:.0f}s"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def snapshot(fetch: Callable[[], Status], out: TextIO, interval_s: float = 0.5) -> None:
    first = fetch()
    time.sleep(interval_s)
    out.write(render(first, fetch(), interval_s))


def live(fetch: Callable[[], Status], out: TextIO, interval_s: float = 1.0) -> None:
    """Redraw until ``q`` (or the pipeline ends: ``fetch`` raises)."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        previous, then = fetch(), time.monotonic()
        while True:
            ready, _, _ = select.select([fd], [], [], interval_s)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                return
            current, now = fetch(), time.monotonic()
            out.write("\033[H\033[2J" + render(previous, current, now - then) + "\n(q quits)\n")
            out.flush()
            previous, then = current, now
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
