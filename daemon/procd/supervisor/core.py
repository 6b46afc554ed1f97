"""The supervisor: one single-threaded event loop over every worker of one pipeline, composed of parts.

``Supervisor.run`` turns one ``loop.Loop``: every source registers its own callback (the signal
wake-up pipe here; each worker's report and output pipes in ``workerio``; the control and
metrics sockets in operations; a reload's check in reload) and every timer is a loop deadline.
Child exits are collected by ``reaper.reap`` alone (``_on_exit`` routes each to its owner).
The parts, each owning one thing:

- ``driver``: feeds each worker slot's events to ``lifecycle.step``, which takes every decision,
  and carries out the actions it returns (spawn, signals, slot timers, held batches, regroups);
- ``workerio``: each worker's report and output pipes, read, decoded and throttled;
- ``groups``: restart histories, finished stages, scale and the paced start queue;
- ``wiring``: each stage's input, from its creation to its end of stream;
- ``reload``: a reload from its request to an applied ``plan.ReloadPlan``;
- ``operations``: the control socket's commands, the metrics endpoint, sd_notify and status;
- ``stopping``: stop requests and their escalation, the exit code, the final sweep.

Signals and control requests lead to the same internal events.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from procd import plan, procctl, reaper, signals
from procd.config import PipelineSpec
from procd.launch.forkserver import ForkServer
from procd.lifecycle import (
    BackoffElapsed,
    StartRequested,
    StopTimedOut,
    Timer,
)
from procd.log import RecordWriter
from procd.ops import status
from procd.ops.commands import default_path
from procd.ops.notify import Notifier
from procd.supervisor import loop
from procd.supervisor.driver import SlotDriver
from procd.supervisor.groups import StageGroups
from procd.supervisor.operations import Operations
from procd.supervisor.reload import Reloader
from procd.supervisor.slots import WorkerSlot
from procd.supervisor.slots import ended as _ended
from procd.supervisor.stopping import Stopper
from procd.supervisor.wiring import Wiring
from procd.supervisor.workerio import WorkerPipes

# Annotations only: importing structlog's typing module would load all of structlog, asyncio
# included, before log.open_logger can defer it; the environment builder (with hashlib and
# libcrypto) is imported where a pipeline with packages or a reload uses it (bench/README.md,
# "Start-up").
if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from procd.launch.environment import Environment


TimerKey = tuple[WorkerSlot, Timer]


class Supervisor:
    """Runs one pipeline from start to exit code."""

    def __init__(
        self,
        spec: PipelineSpec,
        log: FilteringBoundLogger,
        writer: RecordWriter | None = None,
        *,
        control_path: str | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        environment: Environment | None = None,
    ) -> None:
        self.spec = spec
        self.environment = environment  # where function-stage workers run (a pipeline with packages)
        self.env_of: dict[int, Environment] = {}  # pid -> the environment it was started in
        self.control_path = control_path or default_path(spec.name)
        self.started_at = clock()
        self.log = log
        self.writer = writer
        self.clock = clock
        self.rand = rand
        self.slots = [
            WorkerSlot(stage, i)
            for stage in plan.topological_order(spec)
            if spec.runs_here(stage.name)
            for i in range(stage.processes)
        ]
        self.by_pid: dict[int, WorkerSlot] = {}
        self.loop = loop.Loop(clock)
        self.timers: loop.Timers[TimerKey] = loop.Timers(self.loop, self._timer_due)  # the driver's
        self.ready: set[WorkerSlot] = set()
        self.ready_logged = False
        self.ledger = status.Ledger(self.started_at)  # stage totals and rates, for every view
        self.dead_letters: dict[str, int] = {}
        self.forkserver: ForkServer | None = None  # started on first need (start_method = "forkserver")
        self.pipes = WorkerPipes(self.loop, clock, log, lambda s, r: self.driver.on_report(s, r))
        self.driver: SlotDriver = SlotDriver(self, self.pipes)  # drives each worker slot through lifecycle.step
        self.groups: StageGroups = StageGroups(self)
        self.wiring: Wiring = Wiring(self)
        self.stopper: Stopper = Stopper(self)
        self.reloader: Reloader = Reloader(self)
        self.operations: Operations = Operations(self, notifier or Notifier(None, None))

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Start every stage, supervise until every process has ended, return the exit code.

        Raises:
            ControlError: the control socket cannot be created (another procd runs this pipeline).
            transport.Unavailable: a shared backend refused us, or a stop came while waiting for it.
        """
        self.operations.open()
        procctl.set_title(f"procd: {self.spec.name} supervisor")
        procctl.become_subreaper()
        wake = signals.open_wakeup()
        self.loop.watch(wake.read_fd, lambda _events: self._on_signals(wake.drain()))
        try:
            self.wiring.create_inputs(wake)
            self.log.info(
                "pipeline_starting",
                stages=[s.name for s in self.spec.stages],
                workers=len(self.slots),
                start_method=self.spec.start_method,
                supervisor_pid=os.getpid(),
                control=self.control_path,
            )
            for slot in reversed(self.slots):  # readers first, so no writer waits on a missing one
                self.driver.feed(slot, StartRequested())
            trim_due = True
            while not all(_ended(slot) for slot in self.slots):
                if trim_due and self.loop.next_deadline() is None:
                    # about to sleep with nothing scheduled: give the heap that the last burst
                    # of work freed back to the kernel (about 16 us; an idle supervisor stays small)
                    procctl.release_free_memory()
                    trim_due = False
                trim_due = bool(self.loop.run_once()) or trim_due
                # after each turn: what the turn may have changed
                self.operations.tend()
                self.groups.update()
                self.wiring.end_streams()
                self.reloader.release_environments()
                self.operations.update_status()
            return self.stopper.finish()
        finally:
            self.reloader.abandon("procd is ending")
            self.stopper.sweep()
            self.operations.close()
            wake.close()
            self.loop.close()
            self.wiring.close()
            for slot in self.slots:
                if slot.slot_fd is not None:
                    os.close(slot.slot_fd)

    def _timer_due(self, key: TimerKey) -> None:
        """A slot timer is due: the driver's ``StopTimedOut`` or ``BackoffElapsed``."""
        slot, timer = key
        self.driver.feed(slot, StopTimedOut() if timer is Timer.KILL else BackoffElapsed())

    def close_forkserver(self) -> None:
        """Let the fork server go (a reload to another interpreter; the next spawn starts another)."""
        if self.forkserver is not None:
            self.forkserver.close()  # it exits when its socket closes; the reaper collects it
            self.forkserver = None

    # -- inputs from the kernel and the children ---------------------------------------------------

    def _on_signals(self, received: list[int]) -> None:
        for signum in dict.fromkeys(received):  # once each, in order of arrival
            if signum == signal.SIGCHLD:
                for reaped in reaper.reap():
                    self._on_exit(reaped)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stopper.request(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reloader.reload("SIGHUP")
            elif signum == signal.SIGUSR1 and self.writer is not None:
                self.writer.reopen()

    def _on_exit(self, reaped: reaper.Reaped) -> None:
        if self.reloader.reloading is not None and reaped.pid == self.reloader.reloading.check.pid:
            self.reloader.checked(reaped)
            return
        if reaped.pid in self.reloader.checks_killed:
            self.reloader.checks_killed.discard(reaped.pid)
            return
        if self.forkserver is not None and reaped.pid == self.forkserver.pid:
            self.forkserver.close()
            self.forkserver = None
            if not self.stopper.stopping:
                self.log.error("forkserver_died", pid=reaped.pid, code=reaped.code, signal=_signal_name(reaped.signal))
                self.stopper.failed.append(f"the fork server died ({_signal_name(reaped.signal) or reaped.code})")
                self.stopper.request("the fork server died")
            return
        self.driver.on_exit(reaped)  # a worker's, or an orphan's


def _signal_name(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
