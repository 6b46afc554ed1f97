"""What a running pipeline looks like from outside: the ``procd status`` reply (also behind
``procd top`` and the metrics), the one-line ``STATUS=`` for systemd, and the terminal progress
line. Views of the supervisor's slots and queues, plus the one ``Ledger`` that keeps the figures
they show true.

The figures, as the README states them:

- A stage's ``items_in`` / ``items_out`` are totals over every process it ever had: they never go
  backwards when workers restart, are scaled away or replaced by a reload (the ledger keeps what
  departed slots had counted). A redelivered batch counts again.
- *The rate* (``items/s``) is items taken in by the sinks (the stages nothing reads from; for a
  stage that is both producer and sink, its items out) per second, over the last
  ``RATE_WINDOW_S`` seconds, or since the start when the pipeline is younger. Per stage, the same
  window gives items in and out per second. Counts are as of each worker's latest report.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from procd import plan, transport
from procd.config import PipelineSpec
from procd.lifecycle import State
from procd.transport import Input

if TYPE_CHECKING:
    from procd.supervisor.slots import WorkerSlot  # annotations only: ops never runs supervisor code

_ENDED = (State.EXITED, State.FATAL)


RATE_WINDOW_S = 10.0
_SAMPLE_EVERY_S = 0.5

Totals = dict[str, tuple[int, int]]  # stage -> (items in, items out)


class Ledger:
    """Per-stage totals that never go backwards, and the rates over the window."""

    def __init__(self, started_at: float) -> None:
        self._seen: dict[WorkerSlot, tuple[str, int, int]] = {}  # each slot's totals, as last reported
        self._departed: dict[str, tuple[int, int]] = {}  # what slots no longer there had counted
        self._samples: deque[tuple[float, Totals]] = deque([(started_at, {})])

    def observe(self, slot: WorkerSlot) -> None:
        """Note a slot's totals after a report, so that they outlive the slot."""
        self._seen[slot] = (slot.stage.name, slot.total("items_in"), slot.total("items_out"))

    def totals(self, slots: Sequence[WorkerSlot]) -> Totals:
        """Every stage's (items in, items out), departed slots included."""
        present = set(slots)
        for slot in [s for s in self._seen if s not in present]:
            stage, items_in, items_out = self._seen.pop(slot)
            before_in, before_out = self._departed.get(stage, (0, 0))
            self._departed[stage] = (before_in + items_in, before_out + items_out)
        totals = dict(self._departed)
        for slot in slots:
            before_in, before_out = totals.get(slot.stage.name, (0, 0))
            totals[slot.stage.name] = (before_in + slot.total("items_in"), before_out + slot.total("items_out"))
        return totals

    def sample(self, slots: Sequence[WorkerSlot], now: float) -> None:
        """Keep the totals as of ``now`` (at most every half second) as a start for the window."""
        if now - self._samples[-1][0] >= _SAMPLE_EVERY_S:
            self._add(now, self.totals(slots))

    def _add(self, now: float, totals: Totals) -> None:
        self._samples.append((now, totals))
        while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW_S:
            self._samples.popleft()

    def rates(self, totals: Totals, now: float) -> tuple[dict[str, tuple[float, float]], float]:
        """Per stage (in/s, out/s) over the window ending ``now``, and the window's length.

        The window starts at the newest sample at least ``RATE_WINDOW_S`` old (or at the start).
        Samples are taken after every report, so a sample older than that with none after it
        means nothing moved in between: its totals are those of ``now - RATE_WINDOW_S``."""
        if now - self._samples[-1][0] >= _SAMPLE_EVERY_S:
            self._add(now, totals)
        since, base = self._samples[0]
        window = now - max(since, now - RATE_WINDOW_S)
        if window <= 0:
            return {}, 0.0
        rates = {}
        for stage, (items_in, items_out) in totals.items():
            base_in, base_out = base.get(stage, (0, 0))
            rates[stage] = (max(0, items_in - base_in) / window, max(0, items_out - base_out) / window)
        return rates, window


def sink_rate(spec: PipelineSpec, rates: dict[str, tuple[float, float]]) -> float:
    """The rate: items the sinks took in per second (a producer that is a sink: items out)."""
    total = 0.0
    for stage in spec.stages:
        if not spec.readers(stage.name):
            per_in, per_out = rates.get(stage.name, (0.0, 0.0))
            total += per_out if stage.is_producer else per_in
    return total


_WAITING = {transport.slot.WAITING_INPUT: "input", transport.slot.WAITING_OUTPUT: "output"}


def _worker(slot: WorkerSlot, now: float) -> dict[str, Any]:
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
    slots: Sequence[WorkerSlot],
    channels: dict[str, Input],
    ledger: Ledger,
    *,
    finished: set[str],
    dead_letters: dict[str, int],
    stopping: bool,
    uptime_s: float,
    now: float,
) -> dict[str, Any]:
    """Every stage and worker as ``procd status`` shows them."""
    totals = ledger.totals(slots)
    rates, window = ledger.rates(totals, now)
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
                "items_in": totals.get(stage.name, (0, 0))[0],
                "items_out": totals.get(stage.name, (0, 0))[1],
                "items_in_per_s": round(rates.get(stage.name, (0.0, 0.0))[0], 1),
                "items_out_per_s": round(rates.get(stage.name, (0.0, 0.0))[1], 1),
                "queue": queue,
                "workers": workers,
            }
        )
    return {
        "pipeline": spec.name,
        "pid": os.getpid(),
        "state": "stopping" if stopping else "running",
        "uptime_s": round(uptime_s, 3),
        "items_per_s": round(sink_rate(spec, rates), 1),
        "rate_window_s": round(window, 3),
        "stages": stages,
    }


def summary_line(spec: PipelineSpec, slots: Sequence[WorkerSlot], per_s: float) -> str:
    """For ``systemctl status``: stages, workers running, the rate, restarts."""
    running = sum(1 for s in slots if s.state is State.RUNNING)
    restarts = sum(s.restarts for s in slots)
    return (
        f"{len(spec.stages)} stages, {running}/{len(slots)} workers running, {per_s:,.0f} items/s, {restarts} restarts"
    )


def progress_line(spec: PipelineSpec, totals: Totals, per_s: float) -> str:
    """For a terminal: items through each stage (what a sink took in), and the rate."""
    parts = []
    for stage in plan.topological_order(spec):
        items_in, items_out = totals.get(stage.name, (0, 0))
        parts.append(f"{stage.name} {items_in if not spec.readers(stage.name) else items_out:,}")
    return " → ".join(parts) + f"  ({per_s:,.0f} items/s)"
