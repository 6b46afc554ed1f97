"""The slot driver: feeds each worker slot's events to the transition table and carries out the
actions it returns.

Owns: the one place a slot's ``Life`` is replaced (with what ``lifecycle.step`` returned); the
facts an event carries (an exit's runtime, where its input stood, what its slot file held) and
the ``Policy`` (the stage's restart policy and history, the pipeline's stop); carrying out every
action: spawning (a slot file on first need, the fork server on first need), signals, the kill
and restart timers of a slot, held batches (queue capacity given back, a batch noted for
redelivery or abandoned), a rest_for_one group's stop and its start once every member has ended,
a retired slot's removal, and a failure that stops the pipeline; the records of all that
(``worker_spawned``, ``spawn_failed``, ``worker_exited``, ``worker_backoff``, ``stop_escalated``,
``item_redelivered``, ``batch_abandoned``, ``group_restart``, ``stage_fatal``, ``worker_error``,
``item_dead_lettered``, ``orphan_reaped``, ``forkserver_started``), and the reports
that matter to a slot (ready, error, a program that cannot be executed).

Never touches: a decision (whether an exit is a failure, a restart, backoff or fatal, a regroup,
a removal: each is the table's), a slot flag outside what ``step`` returned, the loop and its
deadlines other than the slot timers, the queues' wiring and end of stream, the control socket,
reload, scale, and the stop itself (it asks its host to stop).

Discussion: the driver is a part of the ``Supervisor``, which it reaches through ``Host``: the
few attributes and methods of the supervisor it reads or calls, listed in one place, so that a
part that takes one of them over changes one protocol.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from procd import plan, reaper, reports, transport
from procd.config import PipelineSpec
from procd.context import Output
from procd.launch.forkserver import ForkServer
from procd.launch.spawn import start_forkserver
from procd.lifecycle import (
    TERMINAL,
    AbandonBatch,
    Action,
    ArmTimer,
    CancelTimer,
    ErrorReported,
    Event,
    ExecFailureReported,
    Exited,
    Fail,
    GiveUp,
    InputEnd,
    KeepBatch,
    Leave,
    Policy,
    Ready,
    Regroup,
    RegroupRequested,
    Rejoin,
    Remove,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    StartRequested,
    Timer,
    Transition,
    signal_name,
    step,
)
from procd.restarts import backoff_delay
from procd.supervisor import slots
from procd.supervisor.slots import WorkerSlot
from procd.supervisor.workerio import WorkerPipes

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from procd.launch.environment import Environment  # imported where a build needs it
    from procd.supervisor.groups import StageGroups
    from procd.supervisor.loop import Timers
    from procd.supervisor.operations import Operations
    from procd.supervisor.stopping import Stopper
    from procd.supervisor.wiring import Wiring
    from procd.transport.slot import Header


class Host(Protocol):
    """What the driver reads and calls of the supervisor it is part of, and of its other parts."""

    spec: PipelineSpec
    log: FilteringBoundLogger
    clock: Callable[[], float]
    rand: Callable[[], float]
    environment: Environment | None  # where function-stage workers run
    env_of: dict[int, Environment]
    forkserver: ForkServer | None
    slots: list[WorkerSlot]
    by_pid: dict[int, WorkerSlot]
    timers: Timers[tuple[WorkerSlot, Timer]]
    ready: set[WorkerSlot]
    dead_letters: dict[str, int]
    groups: StageGroups  # restart histories
    wiring: Wiring  # each stage's input
    stopper: Stopper  # the stop, and the failures that ask for it
    operations: Operations  # readiness and counts, for status and sd_notify


class SlotDriver:
    """Drives every worker slot of one supervisor through the transition table."""

    def __init__(self, host: Host, pipes: WorkerPipes) -> None:
        self.host = host
        self.pipes = pipes
        self.regrouping: list[WorkerSlot] = []  # stopped for a rest_for_one restart, started once all have ended

    # -- the table ---------------------------------------------------------------------------------

    def policy(self, slot: WorkerSlot) -> Policy:
        """What the table needs to know around ``slot`` now."""
        host, restart = self.host, slot.stage.restart
        return Policy(
            restart=restart.policy,
            intensity_exceeded=host.groups.histories[slot.stage.name].exceeded(host.clock()),
            stopping=host.stopper.stopping,
            rest_for_one=slot.stage.strategy == "rest_for_one",
            within_s=restart.within_s,
            kill_cause=self._kill_cause(slot),
        )

    def _kill_cause(self, slot: WorkerSlot) -> str:
        """What made a deadline kill ``slot``: the stop's, or, outside a stop, its own retire's or
        regroup's (each ``stop_timeout`` long)."""
        stopper = self.host.stopper
        if not stopper.stopping and (slot.retiring or slot.regrouping):
            reason = "regroup" if slot.regrouping else "retire"
            return f"the {reason} timeout ({self.host.spec.stop_timeout_s:g}s)"
        return stopper.kill_cause()

    def feed(self, slot: WorkerSlot, event: Event) -> Transition:
        """Step the slot's life with ``event`` and carry out the actions; return the transition."""
        transition = self._step(slot, event)
        self._carry_out(slot, transition.actions)
        return transition

    def _step(self, slot: WorkerSlot, event: Event) -> Transition:
        transition = step(slot.life, event, self.policy(slot))
        slot.life = transition.life  # the one assignment of a slot's life
        return transition

    def _carry_out(
        self, slot: WorkerSlot, actions: tuple[Action, ...], held: Header | None = None, exited: Exited | None = None
    ) -> None:
        host = self.host
        for action in actions:
            match action:
                case Spawn():
                    self._spawn(slot)
                case Signal(signum, group):
                    self._signal(slot, signum, group=group)
                case ArmTimer(Timer.KILL):
                    spec_s = host.spec.stop_timeout_s
                    deadline = host.stopper.stop_deadline if host.stopper.stopping else host.clock() + spec_s
                    earlier = host.timers.get((slot, Timer.KILL))  # a retire's or a regroup's, before a stop
                    host.timers[(slot, Timer.KILL)] = deadline if earlier is None else min(earlier, deadline)
                case ArmTimer():
                    spec = slot.stage.restart
                    failures = slot.life.failures
                    delay = backoff_delay(failures, spec.backoff_min_s, spec.backoff_max_s, host.rand)
                    host.timers[(slot, Timer.RESTART)] = host.clock() + delay
                    self._bound(slot).info("worker_backoff", restart_in_s=round(delay, 3), failures=failures)
                case CancelTimer(timer):
                    host.timers.pop((slot, timer), None)
                case KeepBatch() | AbandonBatch():
                    assert held is not None and exited is not None
                    self._held_batch(slot, held, exited, kept=isinstance(action, KeepBatch))
                case Regroup():
                    self._stop_group(slot)
                case Rejoin():
                    self._restart_group_when_ended()
                case Remove():
                    self.remove(slot, exited=exited is not None)
                case GiveUp():
                    self._give_up(slot)
                case Fail(cause):
                    self._fail(slot, cause)

    def _bound(self, slot: WorkerSlot) -> FilteringBoundLogger:
        return slot.bind(self.host.log)

    # -- spawning and signals ------------------------------------------------------------------------

    def _spawn(self, slot: WorkerSlot) -> None:
        host = self.host
        slot.input = host.wiring.channels.get(slot.stage.name)
        slot.outputs = [host.wiring.channels[reader.name] for reader in host.spec.readers(slot.stage.name)]
        try:
            if slot.slot_fd is None:  # EMFILE here is a spawn failure like any other
                keeps_batch = slot.input is not None and slot.stage.redeliver
                slot.slot_fd = transport.slot.create(transport.slot.MESSAGE_CAPACITY if keeps_batch else 0)
            python = host.environment.python if host.environment is not None else None
            start_method = host.spec.start_method
            if python is not None and slot.stage.function is None:
                start_method = "fork"  # a command stage's bridge is procd's code alone: no environment
            if start_method == "forkserver" and host.forkserver is None:
                host.forkserver = start_forkserver(f"procd: {host.spec.name} forkserver", python)
                host.log.info("forkserver_started", pid=host.forkserver.pid)
            pid = slots.start(
                slot,
                server=host.forkserver,
                python=python,
                pipeline=host.spec.name,
                base_dir=host.spec.base_dir,
                state_dir=host.spec.state_dir,
                start_method=start_method,
                input_endpoint=slot.input.endpoint() if slot.input is not None else None,
                outputs=tuple(Output(c.endpoint(), c.spec.batch, c.stage) for c in slot.outputs),
            )
        except OSError as exc:
            self._bound(slot).error("spawn_failed", errno=exc.errno, error=exc.strerror)
            host.groups.histories[slot.stage.name].record(host.clock())  # a failed start counts as a restart
            self.feed(slot, SpawnFailed(exc.errno or 0, exc.strerror or str(exc)))
            return
        if slot.spawned > 1:  # a restart (a slot replacing one a reload retired starts afresh)
            host.groups.histories[slot.stage.name].record(host.clock())
            slot.restarts += 1
        slot.started_at = host.clock()
        host.by_pid[pid] = slot
        if host.environment is not None and slot.stage.function is not None:
            host.env_of[pid] = host.environment
        if slot.input is not None:
            slot.input.readers.add(pid)
        for channel in slot.outputs:
            channel.writers.add(pid)
        self.pipes.watch(slot)
        self._bound(slot).info("worker_spawned", title=f"procd: {host.spec.name}/{slot.name}")
        self.feed(slot, Spawned(pid))

    def _signal(self, slot: WorkerSlot, signum: int, *, group: bool = True) -> None:
        if slot.pid is None:
            return
        if signum == signal.SIGKILL:  # a deadline passed (StopTimedOut)
            stopper, timeout = self.host.stopper, f"{self.host.spec.stop_timeout_s:g}s"
            if stopper.second_stop is not None:
                forced_by, after = "second_signal", f"after {stopper.kill_cause()}"
            elif slot.regrouping and not stopper.stopping:
                forced_by, after = "regroup_timeout", f"{timeout} after it was asked to stop for a rest_for_one restart"
            elif slot.retiring and not stopper.stopping:
                forced_by, after = "retire_timeout", f"{timeout} after it was retired (scale or reload)"
            else:
                forced_by, after = "stop_timeout", f"{timeout} after the stop request"
            self._bound(slot).warning(
                "stop_escalated",
                forced_by=forced_by,
                message=f"{slot.name} still running {after}; sending SIGKILL to its process group",
            )
            stopper.killed(slot)
        try:
            if group:
                os.killpg(slot.pid, signum)
            else:
                os.kill(slot.pid, signum)
        except ProcessLookupError:
            pass

    # -- what a worker says, and its end --------------------------------------------------------------

    def on_report(self, slot: WorkerSlot, report: reports.Report) -> None:
        """A report from the slot's process (``workerio`` decoded it)."""
        host = self.host
        match report:
            case reports.WorkerReady():
                self.feed(slot, Ready())
                host.operations.worker_ready(slot)
            case reports.Error():
                self.feed(slot, ErrorReported(f"{report.error_type}: {report.error}"))
                self._bound(slot).error("worker_error", **dataclasses.asdict(report))
            case reports.ExecFailed():
                self.feed(slot, ExecFailureReported(f"cannot execute {report.program}: {report.error}"))
                self._bound(slot).error("spawn_failed", **dataclasses.asdict(report))
            case reports.Counts():
                slot.counts = {"items_in": report.items_in, "items_out": report.items_out}
                host.operations.counted(slot)
            case reports.DeadLettered():
                host.dead_letters[slot.stage.name] = host.dead_letters.get(slot.stage.name, 0) + 1
                self._bound(slot).warning("item_dead_lettered", **report.fields())

    def on_exit(self, reaped: reaper.Reaped) -> None:
        """A worker (or an orphan the subreaper inherited) was reaped: gather the facts, step,
        record the exit, give back what its process held, carry out the actions."""
        host = self.host
        slot = host.by_pid.pop(reaped.pid, None)
        if slot is None:
            died_of = signal_name(reaped.signal) if reaped.signal is not None else None
            host.log.info("orphan_reaped", pid=reaped.pid, code=reaped.code, signal=died_of)
            return
        self.pipes.close(slot)
        if slot.input is not None:
            slot.input.readers.discard(reaped.pid)
        for channel in slot.outputs:
            channel.writers.discard(reaped.pid)
        held = transport.slot.read(slot.slot_fd) if slot.slot_fd is not None else None
        runtime_s = host.clock() - slot.started_at
        event = Exited(
            reaped.code,
            reaped.signal,
            runtime_s=runtime_s,
            input=_input_end(slot, held),
            held_batch=held is not None and held.holds,
            untracked_batch=_untracked_batch(slot, held),
        )
        transition = self._step(slot, event)
        fields: dict[str, Any] = {"runtime_s": round(runtime_s, 3), "expected": transition.cause is None, **slot.counts}
        if event.signal is not None:
            fields["signal"] = signal_name(event.signal)
        else:
            fields["code"] = event.code
        if transition.cause is not None:
            fields["cause"] = transition.cause
        bound = self._bound(slot)
        (bound.info if transition.cause is None else bound.error)("worker_exited", **fields)
        slot.pid = None  # reaped: the number may be reused by any process from now on
        if held is not None:
            self._reclaim(slot, held)
        self._carry_out(slot, transition.actions, held, event)

    def _reclaim(self, slot: WorkerSlot, held: Header) -> None:
        """Give back the queue capacity the slot file says the ended process may have held."""
        assert slot.slot_fd is not None
        if held.in_token and slot.input is not None:
            slot.input.reclaim()
        if 0 <= held.out_token < len(slot.outputs):
            slot.outputs[held.out_token].reclaim()
        transport.slot.clear_tokens(slot.slot_fd)

    def _held_batch(self, slot: WorkerSlot, held: Header, exited: Exited, *, kept: bool) -> None:
        """The ended process held a batch: its slot's next process delivers it again, or none will."""
        assert slot.slot_fd is not None
        transport.slot.note_exit(slot.slot_fd, exited.signal, exited.code)
        if not held.holds:  # a batch its stage does not track (redeliver = false): gone, count unknown
            self.host.stopper.untracked_lost(slot)
            self._bound(slot).error(
                "batch_abandoned",
                items=None,
                message=(
                    f"{slot.name} ended ({exited.describe()}) while it may have held a batch that redeliver = false "
                    "does not track: its items are lost, how many is not known"
                ),
            )
            return
        pending = held.in_hand
        if kept:
            self._bound(slot).warning(
                "item_redelivered", items=pending, attempt=held.deliveries + 1, reason=exited.describe()
            )
        else:
            self._bound(slot).error(
                "batch_abandoned",
                items=pending,
                message=f"{slot.name} died holding {pending} items and will not be restarted",
            )

    # -- slots leaving, groups, failures -------------------------------------------------------------

    def remove(self, slot: WorkerSlot, *, exited: bool = False) -> None:
        """A retired slot leaves for good (once: a second call does nothing). What its slot file
        still holds, and a kill at the stop's deadline, are told to the stop first: no later
        process will deliver that batch, and the exit code must count it. A batch kept for a
        restart that the retire cancels is said abandoned here (one its process held as it
        ``exited`` was said so with that exit)."""
        host = self.host
        if slot in host.slots:
            host.slots.remove(slot)
        if slot in self.regrouping:  # its group starts again without it (and its stage may be gone)
            self.regrouping.remove(slot)
        host.ready.discard(slot)
        self.pipes.forget(slot)
        if slot.slot_fd is not None:
            held = transport.slot.read(slot.slot_fd)
            if held.holds and not exited:
                pending = held.in_hand
                self._bound(slot).error(
                    "batch_abandoned",
                    items=pending,
                    message=f"{slot.name} leaves holding {pending} items kept for a restart that will not come",
                )
            host.stopper.departed(slot, held)
            os.close(slot.slot_fd)
            slot.slot_fd = None  # (a slot that never ran has no file: it held nothing and was not forced)

    def _stop_group(self, failed: WorkerSlot) -> None:
        """rest_for_one: the failed stage's other workers and every stage downstream of it stop
        (readers finish their batch) and start again, upstream first, once all have ended. The
        table says which of them have a process to stop."""
        spec = self.host.spec
        stages = {failed.stage.name} | {
            s.name for s in spec.stages if failed.stage.name in plan.upstream_closure(spec, s.name)
        }
        group = []
        for slot in [s for s in self.host.slots if s.stage.name in stages and s is not failed and not s.regrouping]:
            leave = Leave.AT_ONCE if slot.stage.is_producer else Leave.AFTER_BATCH
            if self.feed(slot, RegroupRequested(leave)).life.regrouping:
                group.append(slot)
        self.regrouping.extend(group)
        self.host.log.warning(
            "group_restart",
            stage=failed.stage.name,
            strategy="rest_for_one",
            workers=[s.name for s in group],
            message=f"{failed.name} failed; restarting {', '.join(s.name for s in group) or 'nothing else'}",
        )

    def _restart_group_when_ended(self) -> None:
        if self.host.stopper.stopping or any(s.state not in TERMINAL for s in self.regrouping):
            return
        order = {stage.name: i for i, stage in enumerate(plan.topological_order(self.host.spec))}
        group, self.regrouping = self.regrouping, []
        for member in sorted(group, key=lambda s: (order[s.stage.name], s.index)):
            self.feed(member, StartRequested())

    def _give_up(self, slot: WorkerSlot) -> None:
        """The stage went fatal: say so, and fail the pipeline."""
        spec = slot.stage.restart
        restarts = self.host.groups.histories[slot.stage.name].count(self.host.clock())
        self.host.log.error(
            "stage_fatal",
            stage=slot.stage.name,
            restarts=restarts,
            max=spec.max,
            within_s=spec.within_s,
            message=(
                f"{slot.stage.name} restarted {restarts} times within {spec.within_s:g}s (max {spec.max}); giving up"
            ),
        )
        self._fail(slot, f"stage {slot.stage.name} is fatal after {restarts} restarts within {spec.within_s:g}s")

    def _fail(self, slot: WorkerSlot, cause: str) -> None:
        """A failure that is not restarted stops the pipeline, which then exits 1."""
        self.host.stopper.failed.append(f"{slot.name}: {cause}")
        self.host.stopper.request(f"{slot.name} failed: {cause}")


def _untracked_batch(slot: WorkerSlot, held: Header | None) -> bool:
    """The slot's ended process may have held a batch that nothing keeps: its stage does not
    track one (``redeliver = false``), its input does not outlive procd (a durable queue keeps an
    unacknowledged batch for the next run), and its slot file says a receive was armed and not
    followed by the next one (a process waiting for input, or that never received, says EMPTY)."""
    if held is None or held.holds or slot.input is None or slot.stage.redeliver:
        return False
    return held.state == transport.slot.RECEIVING and not slot.input.endpoint().durable


def _input_end(slot: WorkerSlot, held: Header | None) -> InputEnd:
    """Where the slot's ended process stood with its input: its queue, and its slot file's header."""
    if slot.input is None:
        return InputEnd.NONE
    if not slot.input.ended:
        return InputEnd.OPEN
    if held is None or held.input_ended:
        return InputEnd.SEEN
    return InputEnd.ENDED
