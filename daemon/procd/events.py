"""Reading procd's records back: filters, a per-stage summary, and one worker slot's timeline.

The records are the JSON lines ``log`` writes (or journald's copy of them, ``journalctl -o
cat``). A line that is not a procd record is counted and skipped, never an error.
"""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from procd.log import LEVELS

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)\Z")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SHOWN_FIRST = ("ts", "level", "pipeline", "stage", "worker", "pid", "generation", "event")


def timestamp(record: dict[str, Any]) -> float | None:
    """The record's time as a Unix timestamp, or None."""
    try:
        return datetime.datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def parse_when(text: str, now: float) -> float:
    """``10m`` (that long ago) or an ISO 8601 time, as a Unix timestamp.

    Raises:
        ValueError: neither form.
    """
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@dataclass
class RecordReader:
    """Turns lines into records, counting the lines that are not procd's."""

    skipped: int = 0

    def records(self, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.skipped += 1
                continue
            if isinstance(record, dict) and "event" in record and "pipeline" in record:
                yield record
            else:
                self.skipped += 1


@dataclass
class Filter:
    """Which records to keep; an unset field keeps everything."""

    stage: str | None = None
    worker: int | None = None
    events: frozenset[str] = frozenset()
    level: str | None = None
    pid: int | None = None
    since: float | None = None
    until: float | None = None

    def keeps(self, record: dict[str, Any]) -> bool:
        if self.stage is not None and record.get("stage") != self.stage:
            return False
        if self.worker is not None and record.get("worker") != self.worker:
            return False
        if self.events and record.get("event") not in self.events:
            return False
        if self.pid is not None and record.get("pid") != self.pid and record.get("supervisor_pid") != self.pid:
            return False
        if self.level is not None:
            level = record.get("level", "info")
            if level not in LEVELS or LEVELS.index(level) < LEVELS.index(self.level):
                return False
        if self.since is not None or self.until is not None:
            when = timestamp(record)
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when > self.until:
                return False
        return True


@dataclass
class StageSummary:
    spawns: int = 0
    restarts: int = 0
    exits: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    redelivered: int = 0
    items_in: int = 0
    items_out: int = 0
    first: str = ""
    last: str = ""


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, StageSummary]:
    """Per stage: spawns, exits by cause, restarts, dead letters, items in and out, first and last time."""
    stages: dict[str, StageSummary] = {}
    drained: dict[str, dict[str, Any]] = {}
    exited_items: dict[str, list[int]] = {}
    order: list[str] = []
    for record in records:
        if record.get("event") == "pipeline_starting" and isinstance(record.get("stages"), list):
            order = [str(s) for s in record["stages"]]  # the file's order, upstream first
        name = record.get("stage")
        if not isinstance(name, str):
            continue
        summary = stages.setdefault(name, StageSummary())
        ts = str(record.get("ts", ""))
        summary.first = summary.first or ts
        summary.last = ts or summary.last
        event = record.get("event")
        if event == "worker_spawned":
            summary.spawns += 1
            if int(record.get("generation", 1)) > 1:
                summary.restarts += 1
        elif event == "worker_exited":
            cause = f"signal {record['signal']}" if record.get("signal") else f"code {record.get('code')}"
            summary.exits[cause] += 1
            totals = exited_items.setdefault(name, [0, 0])
            totals[0] += int(record.get("items_in", 0))
            totals[1] += int(record.get("items_out", 0))
        elif event == "item_dead_lettered":
            summary.dead_letters += 1
        elif event == "item_redelivered":
            summary.redelivered += 1
        elif event == "stage_drained":
            drained[name] = record
    for name, summary in stages.items():
        if name in drained:
            summary.items_in = int(drained[name].get("items_in", 0))
            summary.items_out = int(drained[name].get("items_out", 0))
        elif name in exited_items:
            summary.items_in, summary.items_out = exited_items[name]
    ranked = {name: i for i, name in enumerate(order)}
    return dict(sorted(stages.items(), key=lambda item: ranked.get(item[0], len(ranked))))


@dataclass
class Generation:
    generation: int
    pid: int | None = None
    spawned: str = ""
    ended: str = ""
    how: str = ""
    runtime_s: float | None = None
    expected: bool | None = None
    cause: str | None = None
    notes: list[str] = field(default_factory=list)


def timeline(records: Iterable[dict[str, Any]], stage: str, worker: int) -> list[Generation]:
    """One worker slot's life, generation by generation."""
    generations: dict[int, Generation] = {}
    for record in records:
        if record.get("stage") != stage or record.get("worker") != worker:
            continue
        number = int(record.get("generation", 0))
        current = generations.setdefault(number, Generation(number))
        event = record.get("event")
        if event == "worker_spawned":
            current.pid, current.spawned = record.get("pid"), str(record.get("ts", ""))
        elif event == "worker_exited":
            current.ended = str(record.get("ts", ""))
            current.how = f"signal {record['signal']}" if record.get("signal") else f"code {record.get('code')}"
            current.runtime_s = record.get("runtime_s")
            current.expected = record.get("expected")
            current.cause = record.get("cause")
        elif event in ("worker_backoff", "item_redelivered", "item_dead_lettered", "stop_escalated", "spawn_failed"):
            detail = {k: v for k, v in record.items() if k not in _SHOWN_FIRST}
            current.notes.append(f"{event} {json.dumps(detail, default=str)}")
    return [generations[n] for n in sorted(generations)]
