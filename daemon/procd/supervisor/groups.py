"""Stage groups: a stage's processes as one group that is started, scaled and seen to finish.

Owns each stage's restart history (``restarts.RestartHistory``, which the slot driver's policy
reads), which stages have finished (every process ended; a stage another host runs has finished
here from the start), and the paced start queue: processes that scale and reload start are forked
at most ``SPAWN_BURST`` at once and ``SPAWN_RATE_PER_S`` after that (a token bucket), so one
request cannot make the loop fork thousands at once. ``scale`` starts or retires the difference
(a sharded producer is resharded: every process replaced through a reload plan).

It never changes a slot's state itself: it feeds the slot driver events (``StartRequested``,
``RetireRequested``) and the transition table decides.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any

from procd import config, plan
from procd.lifecycle import RetireRequested, StartRequested, State
from procd.restarts import RestartHistory
from procd.supervisor import loop
from procd.supervisor.slots import TERMINAL, WorkerSlot, ended

if TYPE_CHECKING:
    from procd.supervisor.core import Supervisor

SPAWN_BURST = 16
SPAWN_RATE_PER_S = 64.0


class StageGroups:
    """Restart histories, finished stages, scale and the paced start of one pipeline's stages."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        spec = sup.spec
        self.histories = {s.name: RestartHistory(s.restart.max, s.restart.within_s) for s in spec.stages}
        # stages whose every process has ended (those another host runs: from the start, here)
        self.finished: set[str] = {s.name for s in spec.stages if not spec.runs_here(s.name)}
        self.start_queue: list[WorkerSlot] = []  # started by scale or reload, waiting for their turn
        self.spawn_tokens = float(SPAWN_BURST)
        self.tokens_at = sup.clock()
        self.starts_due = loop.Alarm(sup.loop, lambda: self.start_paced([]))

    def adopt(self, spec: config.PipelineSpec) -> None:
        """A reload's new stages get a restart history (a kept stage keeps its own)."""
        for stage in spec.stages:
            self.histories.setdefault(stage.name, RestartHistory(stage.restart.max, stage.restart.within_s))

    def update(self) -> None:
        """Mark the stages whose processes have all ended."""
        sup = self.sup
        for stage in sup.spec.stages:
            if stage.name in self.finished:
                continue
            if all(ended(s) for s in sup.slots if s.stage.name == stage.name):
                self.finished.add(stage.name)
                items_in, items_out = sup.ledger.totals(sup.slots).get(stage.name, (0, 0))
                sup.log.info("stage_drained", stage=stage.name, items_in=items_in, items_out=items_out)

    def scale(self, name: object, processes: object) -> dict[str, Any]:
        """Start or retire only the difference; retired readers finish their batch first.

        Never more than the pipeline's process ceiling, and the new processes start at the pace of
        ``start_paced``. A producer is scaled only if it takes a ``shard``: its processes are then
        all replaced, each new one with its share of the new count (another copy of an unsharded
        producer would yield every item again).
        """
        sup = self.sup
        names = [s.name for s in sup.spec.stages]
        if name not in names:
            return {"ok": False, "error": f"unknown stage {name!r}; stages are {', '.join(names)}"}
        ceiling = sup.spec.process_ceiling
        if not isinstance(processes, int) or isinstance(processes, bool) or not 1 <= processes <= ceiling:
            shown = processes if not isinstance(processes, int) or processes < 10**12 else f"{str(processes)[:12]}…"
            return {
                "ok": False,
                "error": f"processes must be an integer from 1 to {ceiling} (pipeline.max_processes), got {shown}",
            }
        if sup.stopper.stopping or name in self.finished:
            return {"ok": False, "error": f"stage {name} is no longer running"}
        stage = sup.spec.stage(str(name))
        live = [s for s in sup.slots if s.stage.name == name and s.state not in TERMINAL and not s.retiring]
        others = sum(1 for s in sup.slots if s.stage.name != name and s.state not in TERMINAL and not s.retiring)
        if others + processes > ceiling:
            return {
                "ok": False,
                "error": (
                    f"stage {name} cannot have {processes} processes: the pipeline would run {others + processes}, "
                    f"more than pipeline.max_processes ({ceiling}); raise it in the file and reload"
                ),
            }
        if stage.is_producer:
            return self._scale_producer(stage, live, processes)
        started: list[WorkerSlot] = []
        if processes > len(live):
            used = {s.index for s in sup.slots if s.stage.name == name}
            free = (i for i in itertools.count() if i not in used)
            position = max(i for i, s in enumerate(sup.slots) if s.stage.name == name) + 1
            started = [WorkerSlot(stage, next(free)) for _ in range(processes - len(live))]
            sup.slots[position:position] = started
        retiring = sorted(live, key=lambda s: s.index)[processes:]
        sup.log.info(
            "stage_scaled",
            stage=name,
            processes_from=len(live),
            processes_to=processes,
            started=[s.index for s in started],
            retiring=[s.index for s in retiring],
        )
        for slot in retiring:
            sup.driver.feed(slot, RetireRequested())
        waiting = self.start_paced(started)
        return {
            "ok": True,
            "stage": name,
            "processes": processes,
            "started": [s.index for s in started],
            "retiring": [s.index for s in retiring],
            "waiting": waiting,
        }

    def _scale_producer(self, stage: config.StageSpec, live: list[WorkerSlot], processes: int) -> dict[str, Any]:
        """A sharded producer's every process is replaced by ``processes`` new ones, each with
        its shard of the new count (a process's share cannot change while it runs)."""
        sup = self.sup
        if not stage.shardable:
            return {
                "ok": False,
                "error": (
                    f"stage {stage.name} is a producer: another process would yield every item again; "
                    'a producer that accepts a "shard" parameter and keeps no checkpoint can be scaled (see the README)'
                ),
            }
        reply: dict[str, Any] = {"ok": True, "stage": stage.name, "processes": processes}
        if processes == len(live):
            return {**reply, "started": [], "retiring": [], "waiting": 0}
        resharded = dataclasses.replace(stage, processes=processes)
        new = dataclasses.replace(
            sup.spec, stages=tuple(resharded if s.name == stage.name else s for s in sup.spec.stages)
        )
        leaving, arriving = sup.reloader.apply(new, plan.reload_plan(sup.spec, new, self.finished))
        started, retiring = [s.index for s in arriving], [s.index for s in leaving]
        sup.log.info(
            "stage_scaled",
            stage=stage.name,
            processes_from=len(live),
            processes_to=processes,
            started=started,
            retiring=retiring,
            resharded=True,
        )
        waiting = sum(1 for s in arriving if s.state is State.STOPPED)
        return {**reply, "started": started, "retiring": retiring, "waiting": waiting, "resharded": True}

    def start_paced(self, slots: list[WorkerSlot]) -> int:
        """Start ``slots`` at most ``SPAWN_BURST`` at once and ``SPAWN_RATE_PER_S`` after that (a
        token bucket); return how many still wait. A waiting slot shows as ``stopped``; one
        retired or stopped meanwhile is not started."""
        sup = self.sup
        self.start_queue.extend(slots)
        now = sup.clock()
        self.spawn_tokens = min(SPAWN_BURST, self.spawn_tokens + (now - self.tokens_at) * SPAWN_RATE_PER_S)
        self.tokens_at = now
        while self.start_queue and self.spawn_tokens >= 1:
            slot = self.start_queue.pop(0)
            if slot in sup.slots and slot.state is State.STOPPED and not sup.stopper.stopping and not slot.retiring:
                self.spawn_tokens -= 1
                sup.driver.feed(slot, StartRequested())
        if self.start_queue:
            self.starts_due.set(now + (1 - self.spawn_tokens) / SPAWN_RATE_PER_S)
        else:
            self.starts_due.clear()
        return len(self.start_queue)
