"""What a running pipeline looks like from outside: the ``procd status`` reply (also behind
``procd top`` and the metrics), the one-line ``STATUS=`` for systemd, and the terminal progress
line. Views only: they read the supervisor's slots and queues and change nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from procd import plan, transport
from procd.config import PipelineSpec
from procd.lifecycle import State
from procd.transport import Input
from procd.worker import Slot

_ENDED = (State.EXITED, State.FATAL)


class Rate:
    """Items per second, over windows of at least a second."""

    def __init__(self) -> None:
        self._seen, self._when, self.per_s = 0, 0.0, 0.0

    def update(self, seen: int, now: float) -> float:
        if now - self._when >= 1.0:
            self.per_s = (seen - self._seen) / (now - self._when) if self._when else 0.0
            self._seen, self._when = seen, now
        return self.per_s


_WAITING = {transport.slot.WAITING_INPUT: "input", transport.slot.WAITING_OUTPUT: "output"}


def _worker(slot: Slot, now: float) -> dict[str, Any]:
    state, blocked = str(slot.state), None
    if slot.state is State.RUNNING and slot.pid is not None and slot.slot_fd is not None:
        blocked = _WAITING.get(transport.slot.read(slot.slot_fd).waiting)  # the worker says so itself
        state = "blocked" if blocked else state
    alive = slot.state not in _ENDED
    return {
        "index": slot.index,
        "pid": slot.pid if alive else None,
        "state": state,
        "blocked_on": blocked,
        "generation": slot.generation,
        "restarts": slot.restarts,
        "uptime_s": round(now - slot.started_at, 3) if alive else None,
        "items_in": slot.total("items_in"),
        "items_out": slot.total("items_out"),
    }


def snapshot(
    spec: PipelineSpec,
    slots: Sequence[Slot],
    channels: dict[str, Input],
    *,
    finished: set[str],
    dead_letters: dict[str, int],
    stopping: bool,
    uptime_s: float,
    now: float,
) -> dict[str, Any]:
    """Every stage and worker as ``procd status`` shows them."""
    stages = []
    for stage in plan.topological_order(spec):
        mine = [s for s in slots if s.stage.name == stage.name]
        workers = [_worker(slot, now) for slot in mine]
        queue = None
        if stage.name in channels:
            queue = {
                "depth_batches": channels[stage.name].depth(),
                "capacity_batches": stage.queue.slots,
                "maxsize": stage.queue.maxsize,
                "batch": stage.queue.batch,
            }
        stages.append(
            {
                "name": stage.name,
                "processes": sum(1 for s in mine if s.state not in _ENDED),
                "finished": stage.name in finished,
                "dead_letters": dead_letters.get(stage.name, 0),
                "restarts": sum(s.restarts for s in mine),
                "items_in": sum(s.total("items_in") for s in mine),
                "items_out": sum(s.total("items_out") for s in mine),
                "queue": queue,
                "workers": workers,
            }
        )
    return {
        "pipeline": spec.name,
        "pid": os.getpid(),
        "state": "stopping" if stopping else "running",
        "uptime_s": round(uptime_s, 3),
        "stages": stages,
    }


def items_seen(slots: Sequence[Slot]) -> int:
    return sum(s.total("items_in") + s.total("items_out") for s in slots)


def summary_line(spec: PipelineSpec, slots: Sequence[Slot], per_s: float) -> str:
    """For ``systemctl status``: stages, workers running, items/s, restarts."""
    running = sum(1 for s in slots if s.state is State.RUNNING)
    restarts = sum(s.restarts for s in slots)
    return (
        f"{len(spec.stages)} stages, {running}/{len(slots)} workers running, {per_s:,.0f} items/s, {restarts} restarts"
    )


def progress_line(spec: PipelineSpec, slots: Sequence[Slot], per_s: float) -> str:
    """For a terminal: items through each stage (what a sink took in), and the rate."""
    parts = []
    for stage in plan.topological_order(spec):
        mine = [s for s in slots if s.stage.name == stage.name]
        key = "items_in" if not spec.readers(stage.name) else "items_out"
        parts.append(f"{stage.name} {sum(s.total(key) for s in mine):,}")
    return " → ".join(parts) + f"  ({per_s:,.0f} items/s)"
