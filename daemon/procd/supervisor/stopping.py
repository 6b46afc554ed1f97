"""Stopping: a stop request, its escalation, and the pipeline's last word (its exit code).

Owns whether the pipeline is stopping, why (the first request's reason), the stop deadline, the
signal that asked a second time, and the failures that make the exit code 1. A stop sends
``StopRequested`` to the producers (SIGTERM) and ``DrainRequested`` to every other worker, which
drains its input in the usual way; whatever still runs at the deadline gets SIGKILL (the slot
driver's KILL timers, which a second SIGTERM or SIGINT brings forward to now). Once every process
has ended, ``finish`` counts what was abandoned and returns the exit code, and ``sweep`` kills and
reaps whatever of ours is left.

What was abandoned includes what left earlier: a retired slot (scale-down, reload) that leaves
holding a batch (``departed``, from the slot driver's removal, before its slot file is closed),
and a retired input that is let go with batches no reader will read (``input_left``, from the
wiring). A retired worker killed at the stop's deadline is forced like any other (``killed``,
from the slot driver as it sends SIGKILL, so a slot that leaves is not missed).

It never decides a slot's state: the transition table turns the stop events into signals and
timers, and the slot driver carries them out.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from procd import reaper, transport
from procd.lifecycle import DrainRequested, StopRequested, Timer

if TYPE_CHECKING:
    from procd.supervisor.core import Supervisor
    from procd.supervisor.slots import WorkerSlot
    from procd.transport import Input
    from procd.transport.slot import Header

_COUNTS = ("queued_batches", "queued_items_at_most", "in_hand_items")


class Abandoned:
    """Items neither delivered nor dead-lettered, per stage, and how many of them end with this
    process (those of an input that is not durable: a durable one keeps them for the next run)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, int]] = {}
        self.lost = {"queued_batches": 0, "in_hand_items": 0}

    def add(
        self, stage: str, *, durable: bool, queued_batches: int = 0, batch: int = 0, in_hand_items: int = 0
    ) -> None:
        """Count ``queued_batches`` (of at most ``batch`` items each) and ``in_hand_items``."""
        counts = self.stages.setdefault(stage, dict.fromkeys(_COUNTS, 0))
        counts["queued_batches"] += queued_batches
        counts["queued_items_at_most"] += queued_batches * batch
        counts["in_hand_items"] += in_hand_items
        if not durable:
            self.lost["queued_batches"] += queued_batches
            self.lost["in_hand_items"] += in_hand_items

    def add_input(self, channel: Input, queued: int | None = None) -> None:
        """Count the batches left in ``channel`` (``queued``, when its depth was just read)."""
        queued = (channel.depth() or 0) if queued is None else queued
        self.add(channel.stage, durable=channel.endpoint().durable, queued_batches=queued, batch=channel.spec.batch)

    def merge(self, other: Abandoned) -> None:
        """Add what ``other`` counted."""
        for stage, counts in other.stages.items():
            mine = self.stages.setdefault(stage, dict.fromkeys(_COUNTS, 0))
            for key, value in counts.items():
                mine[key] += value
        for key, value in other.lost.items():
            self.lost[key] += value


class Stopper:
    """The stop of one pipeline, from the first request to the exit code."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.stopping = False
        self.stop_deadline = 0.0
        self.second_stop: str | None = None  # the signal that asked to stop a second time
        self.stop_reason: str | None = None  # the first stop request's
        self.failed: list[str] = []  # what makes the exit code 1
        self.left = Abandoned()  # what retired slots and inputs left behind as they went
        self.forced: list[str] = []  # workers killed at the stop's deadline (retired ones too)

    def kill_cause(self) -> str:
        """What made a stop kill: a second stop request, or the stop timeout."""
        if self.second_stop is not None:
            return f"a second stop request ({self.second_stop})"
        return f"the stop timeout ({self.sup.spec.stop_timeout_s:g}s)"

    def request(self, reason: str) -> None:
        """Stop the pipeline (a signal, the control socket, or a failure); a second SIGTERM or
        SIGINT kills every worker now."""
        sup = self.sup
        if self.stopping:
            if reason in ("SIGTERM", "SIGINT") and self.second_stop is None:
                self.second_stop = reason
                sup.log.warning(
                    "stop_requested",
                    reason=reason,
                    message=f"second stop request ({reason}); killing every worker now",
                )
                self.stop_deadline = sup.clock()
                for key in sup.timers:
                    if key[1] is Timer.KILL:
                        sup.timers[key] = self.stop_deadline
            return
        self.stopping = True
        self.stop_reason = reason
        sup.reloader.abandon("the pipeline is stopping")
        sup.operations.notify(STOPPING=1, STATUS=f"stopping: {reason}")
        self.stop_deadline = sup.clock() + sup.spec.stop_timeout_s
        sup.log.info("stop_requested", reason=reason, stop_timeout_s=sup.spec.stop_timeout_s)
        for slot in sup.slots:
            sup.driver.feed(slot, StopRequested() if slot.stage.is_producer else DrainRequested())

    def killed(self, slot: WorkerSlot) -> None:
        """``slot``'s process is sent SIGKILL at a deadline. During a stop the drain was forced.
        Outside one (a retired worker's deadline, a rest_for_one restart's) the kill ends the
        process like a crash, and what it held is counted as exactly: a batch kept for its slot's
        next process is delivered again, one it leaves with is abandoned, and one its stage does
        not track (``redeliver = false``) is counted lost when its exit is seen."""
        if self.stopping and slot.name not in self.forced:
            self.forced.append(slot.name)

    def departed(self, slot: WorkerSlot, held: Header | None) -> None:
        """A retired slot leaves the pipeline (its slot file says ``held``): a batch it still
        holds will never be delivered."""
        if held is not None and held.holds:
            durable = slot.input is not None and slot.input.endpoint().durable
            self.left.add(slot.stage.name, durable=durable, in_hand_items=held.in_hand)

    def untracked_lost(self, slot: WorkerSlot) -> None:
        """``slot``'s process failed while it may have held a batch that its stage does not track
        (``redeliver = false``): its items are lost, how many is not known."""
        self.failed.append(
            f"{slot.name} ended while it may have held a batch that redeliver = false does not track "
            "(its items were neither delivered nor dead-lettered)"
        )

    def input_left(self, channel: Input, queued: int) -> None:
        """A retired input is let go with ``queued`` batches, which no reader will read."""
        self.left.add_input(channel, queued)

    def finish(self) -> int:
        """Every process has ended: say what was abandoned and how the pipeline ended; return
        the exit code."""
        sup = self.sup
        forced = self.forced
        abandoned = self._abandoned()
        totals = dict.fromkeys(_COUNTS, 0)
        for stage, counts in abandoned.stages.items():
            if any(counts.values()):
                sup.log.warning(
                    "stage_abandoned",
                    stage=stage,
                    **counts,
                    message=(
                        f"{stage}: {counts['in_hand_items']} items in hand and {counts['queued_batches']} batches "
                        f"(at most {counts['queued_items_at_most']} items) in its queue were neither delivered "
                        "nor dead-lettered"
                    ),
                )
            for key, value in counts.items():
                totals[key] += value
        lost = abandoned.lost
        if any(lost.values()):  # exit 0 says every item reached a sink or a dead-letter file
            self.failed.append(
                f"{lost['in_hand_items']} items in hand and {lost['queued_batches']} batches in queues that do "
                "not outlive procd were neither delivered nor dead-lettered"
            )
        code = 1 if self.failed or forced else 0
        # finished: every stage ended by itself; stopped: a stop request (signal or control
        # socket) and a clean drain; failed: a failure, or a drain that had to be forced
        outcome = "failed" if code else "stopped" if self.stopping else "finished"
        sup.log.info(
            "pipeline_stopped",
            exit_code=code,
            outcome=outcome,
            stop_reason=self.stop_reason,
            failures=self.failed,
            forced=forced,
            forced_by=self.kill_cause() if forced else None,
            abandoned=totals,
        )
        return code

    def _abandoned(self) -> Abandoned:
        """Once every process has ended, per stage: the batches left in its input queues (the
        current one, and any a reload retired that is still open, with the most items they can
        hold), the items its slots still hold (from the slot files' headers: nothing is
        unpickled), and what retired slots and inputs left behind earlier."""
        sup = self.sup
        found = Abandoned()
        for stage in sup.spec.stages:
            channel = sup.wiring.channels.get(stage.name)
            held = [
                transport.slot.read(s.slot_fd)
                for s in sup.slots
                if s.stage.name == stage.name and s.slot_fd is not None
            ]
            found.add(
                stage.name,
                durable=channel is not None and channel.endpoint().durable,
                queued_batches=(channel.depth() or 0) if channel is not None else 0,
                batch=stage.queue.batch,
                in_hand_items=sum(h.in_hand for h in held),
            )
        for channel in sup.wiring.retired:
            found.add_input(channel)
        found.merge(self.left)
        return found

    def sweep(self) -> None:
        """Nothing left running: SIGKILL any process group of ours that still has a member, and
        reap what that frees."""
        sup = self.sup
        waiting = set(sup.by_pid) | sup.reloader.checks_killed  # and a reload's check killed at a stop
        if sup.forkserver is not None:
            sup.forkserver.close()  # the server ends when its socket does
            waiting.add(sup.forkserver.pid)
        for pid in sup.by_pid:  # only processes not yet reaped: a reaped pid may be someone else's now
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + 1.0
        while waiting and time.monotonic() < deadline:
            for reaped in reaper.reap():
                waiting.discard(reaped.pid)
            time.sleep(0.005)
        for _ in reaper.reap():
            pass
