"""``procd top``: a live view of a running pipeline, fed by its control socket.

On a terminal the view is redrawn in place once a second and ``q`` quits; otherwise one snapshot
is printed. The rates are the supervisor's own (``status.Ledger``: per second over its stated
window, from the workers' latest counts), so one reply is enough and every view agrees.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import tty
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

Status = dict[str, Any]


def render(reply: Status) -> str:
    """The view of one status reply: a header with the rate, then one row per stage."""
    rows = [("STAGE", "PROCS", "STATES", "IN", "OUT", "IN/s", "OUT/s", "QUEUE", "RESTARTS", "DEAD")]
    for stage in reply["stages"]:
        states = Counter(w["state"] for w in stage["workers"])
        queue = stage["queue"]
        rows.append(
            (
                stage["name"],
                str(stage["processes"]),
                ", ".join(f"{state} {n}" for state, n in sorted(states.items())),
                f"{stage['items_in']:,}",
                f"{stage['items_out']:,}",
                f"{stage['items_in_per_s']:,.0f}",
                f"{stage['items_out_per_s']:,.0f}",
                "-" if queue is None else f"{queue['depth_batches']}/{queue['capacity_batches']}",
                str(stage["restarts"]),
                str(stage["dead_letters"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"procd top — {reply['pipeline']}  pid {reply['pid']}  {reply['state']}  up {reply['uptime_s']:.0f}s  "
        f"{reply['items_per_s']:,.0f} items/s into the sinks (last {reply['rate_window_s']:.0f}s)"
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def snapshot(fetch: Callable[[], Status], out: TextIO) -> None:
    out.write(render(fetch()))


def live(fetch: Callable[[], Status], out: TextIO, interval_s: float = 1.0) -> None:
    """Redraw until ``q`` (or the pipeline ends: ``fetch`` raises)."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        while True:
            out.write("\033[H\033[2J" + render(fetch()) + "\n(q quits)\n")
            out.flush()
            ready, _, _ = select.select([fd], [], [], interval_s)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                return
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
