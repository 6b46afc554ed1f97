"""Wiring: each stage's input, from its creation to the end of its stream.

Owns the inputs (``transport.Input``): the current one of each stage that reads, the ones a
reload retired that are still draining, and which of them cannot reach their shared backend now.
It creates them (a shared backend that cannot be reached is waited for), keeps a shared backend's
heartbeat, and ends each stream: the supervisor holds a copy of each input's writing end until
every stage that feeds it has finished (all its processes exited); dropping that copy is what lets
the readers see the end of their input. A while after an end, an input whose readers still wait
has its holders named (``input_held_open``). A retired input that is let go while it still
queues batches (its readers died, or none was left) says so (``input_abandoned``) and tells the
stop, which counts them against the exit code.

It never starts, stops or signals a worker, and never decides when a stage has finished (the
stage groups do): it reads ``groups.finished``.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Set
from typing import TYPE_CHECKING

from procd import config, procinfo, signals, transport
from procd.supervisor import loop
from procd.transport import Input

if TYPE_CHECKING:
    from procd.supervisor.core import Supervisor

# After an input's end of stream, how long before procd looks for processes that are not workers
# and still hold its writing end (a stage's forked child), which keep its readers waiting.
HELD_OPEN_AFTER_S = 1.0


class Wiring:
    """The inputs of one pipeline's stages."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.channels: dict[str, Input] = {}  # each stage's current input
        self.retired: list[Input] = []  # inputs replaced by a reload, still draining
        self.transport_down: set[str] = set()  # inputs whose shared backend cannot be reached now
        self.housekeeping_due = loop.Alarm(sup.loop, self.housekeep)
        self.held: loop.Timers[str] = loop.Timers(sup.loop, self._name_holders)  # inputs ended a while ago

    def create_inputs(self, wake: signals.WakeUp) -> None:
        """Create the input of every stage that reads, here or from a stage that runs here.

        Raises:
            transport.Unavailable: a backend refused us (a login), or a stop came first.
        """
        spec = self.sup.spec
        for stage in spec.stages:
            writing = [u for u in stage.inputs if spec.runs_here(u)]
            if not stage.is_producer and (writing or spec.runs_here(stage.name)):
                self.channels[stage.name] = self._create(stage, writing, wake)
        if any(channel.housekeeping_s() for channel in self.channels.values()):
            self.housekeeping_due.set(self.sup.clock())

    def _create(self, stage: config.StageSpec, writing: list[str], wake: signals.WakeUp) -> Input:
        """The input of ``stage``; a shared backend that cannot be reached is waited for, with
        backoff and a record, until it can or a stop signal comes.

        Raises:
            transport.Unavailable: the backend refused us (a login), or a stop came first.
        """
        delay = 0.1
        while True:
            try:
                made = transport.create(stage.name, stage.queue)
                made.write_from(writing)
            except transport.Unavailable as exc:
                if exc.final:
                    raise
                self._down(stage.name, exc, retry_in_s=delay)
                ready, _, _ = select.select([wake.read_fd], [], [], delay)
                if ready and {signal.SIGTERM, signal.SIGINT} & set(wake.drain()):
                    raise transport.Unavailable(f"{exc}; stopped while waiting for it", final=True) from None
                delay = min(delay * 2, 5.0)
                continue
            self._up(stage.name)
            return made

    def _down(self, stage: str, exc: transport.Unavailable, **fields: float) -> None:
        """An outage is said once."""
        if stage not in self.transport_down:
            self.transport_down.add(stage)
            self.sup.log.error("transport_unavailable", stage=stage, error=str(exc), **fields)

    def _up(self, stage: str) -> None:
        """The return is said once."""
        if stage in self.transport_down:
            self.transport_down.discard(stage)
            self.sup.log.info("transport_restored", stage=stage)

    def housekeep(self) -> None:
        """A shared backend's heartbeat; an outage and the return are each said once."""
        now = self.sup.clock()
        intervals = []
        for channel in [*self.channels.values(), *self.retired]:
            interval = channel.housekeeping_s()
            if interval is None or channel.ended:
                continue
            intervals.append(interval)
            try:
                channel.housekeep()
            except transport.Unavailable as exc:
                self._down(channel.stage, exc)
                continue
            self._up(channel.stage)
        if intervals:
            # while the server is away, look again soon: the heartbeat is what keeps this host's
            # writers counted as alive by the other hosts
            self.housekeeping_due.set(now + (1.0 if self.transport_down else min(intervals)))
        else:
            self.housekeeping_due.clear()

    def end_streams(self) -> None:
        """End each input whose feeding stages have all finished; close the retired inputs that
        have drained."""
        finished = self.sup.groups.finished
        for name, channel in self.channels.items():
            if not channel.ended and all(upstream in finished for upstream in self.sup.spec.stage(name).inputs):
                channel.end()
                self.held[name] = self.sup.clock() + HELD_OPEN_AFTER_S
        for channel in list(self.retired):
            if not channel.ended and not channel.writers:
                channel.end()
            if channel.drained():
                self._let_go(channel)

    def replace(self, fresh: dict[str, Input], leaving: Set[str]) -> None:
        """A reload's new inputs take the place of the ``leaving`` stages' (which drain, retired)."""
        for name in leaving:
            leaving_channel = self.channels.pop(name, None)
            if leaving_channel is not None:
                leaving_channel.current = False
                self.retired.append(leaving_channel)
        self.channels.update(fresh)

    def _let_go(self, channel: Input) -> None:
        """A retired input nobody reads any more is closed: what it still queues no reader will
        read, which the stop counts against the exit code (and says here, as it happens)."""
        queued = channel.depth() or 0
        if queued:
            self.sup.stopper.input_left(channel, queued)
            self.sup.log.warning(
                "input_abandoned",
                stage=channel.stage,
                queued_batches=queued,
                queued_items_at_most=queued * channel.spec.batch,
                message=(
                    f"a retired input of {channel.stage} is closed with {queued} batches (at most "
                    f"{queued * channel.spec.batch} items) that no reader here will read"
                ),
            )
        channel.close()
        self.retired.remove(channel)

    def close(self) -> None:
        """procd ends: let go of every input."""
        for channel in [*self.channels.values(), *self.retired]:
            channel.close()

    def _name_holders(self, name: str) -> None:
        """An input was ended a while ago and its readers still run: name any process that is not
        a worker and holds its writing end (its readers cannot see the end until it lets go)."""
        sup = self.sup
        channel = self.channels.get(name)
        if channel is None or name in sup.groups.finished or not channel.readers:
            return
        holders = [pid for pid in channel.holders() if pid not in sup.by_pid and pid != os.getpid()]
        if holders:
            sup.log.warning(
                "input_held_open",
                stage=name,
                holders=holders,
                titles=[procinfo.title(pid) for pid in holders],
                message=(
                    f"the input of {name} has ended, but process {', '.join(map(str, holders))} still holds its "
                    "writing end (a child forked by stage code?); its readers wait until that process exits"
                ),
            )
