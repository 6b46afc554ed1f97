"""The supervisor: one single-threaded event loop over every worker of one pipeline, composed of parts.

``Supervisor.run`` turns one ``loop.Loop``: every source registers its own callback (the signal
wake-up pipe here; each worker's report and output pipes in the slot driver; the control and
metrics sockets in operations; a reload's check in reload) and every timer is a loop deadline.
Child exits are collected by ``reaper.reap`` alone. The parts, each owning one thing:

- the slot driver (the methods from ``_policy`` to ``_close_pipes``): every change of a slot's
  state goes through ``lifecycle.step``; it carries out the actions and logs each fact;
- ``groups``: restart histories, finished stages, scale and the paced start queue;
- ``wiring``: each stage's input, from its creation to its end of stream;
- ``reload``: a reload from its request to an applied ``plan.ReloadPlan``;
- ``operations``: the control socket's commands, the metrics endpoint, sd_notify and status;
- ``stopping``: stop requests and their escalation, the exit code, the final sweep.

Signals and control requests lead to the same internal events.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procd import plan, procctl, procinfo, reaper, signals, transport
from procd.config import PipelineSpec
from procd.context import Output
from procd.launch.environment import Environment
from procd.launch.forkserver import ForkServer
from procd.launch.spawn import start_forkserver
from procd.lifecycle import (
    Action,
    ArmTimer,
    BackoffElapsed,
    CancelTimer,
    Event,
    Exited,
    Policy,
    Ready,
    Restart,
    RetireRequested,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    StartRequested,
    State,
    StopRequested,
    StopTimedOut,
    Timer,
    step,
)
from procd.log import RecordWriter
from procd.ops import status
from procd.ops.control import default_path
from procd.ops.notify import Notifier
from procd.restarts import backoff_delay
from procd.supervisor import loop, slots
from procd.supervisor.groups import StageGroups
from procd.supervisor.operations import Operations
from procd.supervisor.reload import Reloader, Reloading
from procd.supervisor.slots import TERMINAL, WorkerSlot
from procd.supervisor.slots import ended as _ended
from procd.supervisor.stopping import Stopper
from procd.supervisor.wiring import Wiring
from procd.throttle import OutputThrottle

# Annotations only: importing structlog's typing module would load all of structlog, asyncio
# included, before log.open_logger can defer it.
if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_LINE_LIMIT = 4096

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
        self.regrouping: list[WorkerSlot] = []  # stopped for a rest_for_one restart, started once all have ended
        self.deadlines: loop.Timers[str] = loop.Timers(self.loop, lambda _output: self._report_suppressed_due())
        self.ledger = status.Ledger(self.started_at)  # stage totals and rates, for every view
        self.dead_letters: dict[str, int] = {}
        self.throttles: dict[WorkerSlot, OutputThrottle] = {}  # each worker slot's output budget
        self.forkserver: ForkServer | None = None  # started on first need (start_method = "forkserver")
        self.selector = _Pipes(self.loop, self._read_reports, self._read_output)  # the driver's
        self.groups = StageGroups(self)
        self.wiring = Wiring(self)
        self.stopper = Stopper(self)
        self.reloader = Reloader(self)
        self.operations = Operations(self, notifier or Notifier(None, None))
        # the slot driver's names for what the parts own (until it asks the parts itself)
        self.histories = self.groups.histories
        self.channels = self.wiring.channels
        self.finished = self.groups.finished
        self.failed = self.stopper.failed
        self.checks_killed = self.reloader.checks_killed
        self._request_stop = self.stopper.request
        self._kill_cause = self.stopper.kill_cause
        self._reload_checked = self.reloader.checked
        self.reload = self.reloader.reload
        self._notify = self.operations.notify
        self._status_line = self.operations.status_line
        self._show_progress = self.operations.show_progress

    @property
    def stopping(self) -> bool:
        return self.stopper.stopping

    @property
    def stop_deadline(self) -> float:
        return self.stopper.stop_deadline

    @property
    def second_stop(self) -> str | None:
        return self.stopper.second_stop

    @property
    def reloading(self) -> Reloading | None:
        return self.reloader.reloading

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
                self._feed(slot, StartRequested())
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
        self._feed(slot, StopTimedOut() if timer is Timer.KILL else BackoffElapsed())

    def _close_forkserver(self) -> None:
        if self.forkserver is not None:
            self.forkserver.close()  # it exits when its socket closes; the reaper collects it
            self.forkserver = None

    # -- state changes ----------------------------------------------------------------------------

    def _policy(self, slot: WorkerSlot, event: Event | None = None) -> Policy:
        """The restart policy in force for ``slot`` now: none while stopping; none for a process
        that ended cleanly after its input had ended (a new one would only see the end again)
        unless the slot holds a batch its next process must deliver. A process that failed after
        the end of its input is restarted by the stage's policy: its queue may still hold items
        (a new process that finds it empty ends at once)."""
        stage = slot.stage
        if self.stopping or slot.retiring or slot.exec_failed:
            return Policy(Restart.NO)  # a program that cannot be executed will not start next time
        failed = isinstance(event, Exited) and not event.ok
        if self._input_ended(slot) and not failed and not self._holds_batch(slot):
            return Policy(Restart.NO)
        return Policy(stage.restart.policy, self.histories[stage.name].exceeded(self.clock()))

    def _holds_batch(self, slot: WorkerSlot) -> bool:
        """The slot file's header says a batch is held (read as numbers: nothing is unpickled)."""
        return slot.slot_fd is not None and transport.slot.read(slot.slot_fd).holds

    def _saw_input_end(self, slot: WorkerSlot) -> bool:
        """The slot file's header says its process received its input's end of stream."""
        return slot.slot_fd is None or bool(transport.slot.read(slot.slot_fd).input_ended)

    def _input_ended(self, slot: WorkerSlot) -> bool:
        channel = slot.input or self.channels.get(slot.stage.name)
        return channel is not None and channel.ended

    def _feed(self, slot: WorkerSlot, event: Event) -> None:
        transition = step(slot.state, event, self._policy(slot, event))
        slot.state = transition.state
        for action in transition.actions:
            self._do(slot, action)

    def _do(self, slot: WorkerSlot, action: Action) -> None:
        if isinstance(action, Spawn):
            self._spawn(slot)
        elif isinstance(action, Signal):
            self._signal(slot, action.signum, group=action.group)
        elif isinstance(action, ArmTimer) and action.timer is Timer.KILL:
            deadline = self.stop_deadline if self.stopping else self.clock() + self.spec.stop_timeout_s
            self.timers[(slot, Timer.KILL)] = deadline
        elif isinstance(action, ArmTimer):
            spec = slot.stage.restart
            slot.failures += 1
            delay = backoff_delay(slot.failures, spec.backoff_min_s, spec.backoff_max_s, self.rand)
            self.timers[(slot, Timer.RESTART)] = self.clock() + delay
            self._bound(slot).info("worker_backoff", restart_in_s=round(delay, 3), failures=slot.failures)
        elif isinstance(action, CancelTimer):
            self.timers.pop((slot, action.timer), None)

    def _bound(self, slot: WorkerSlot) -> FilteringBoundLogger:
        return self.log.bind(stage=slot.stage.name, worker=slot.index, pid=slot.pid, generation=slot.generation)

    def _spawn(self, slot: WorkerSlot) -> None:
        slot.input = self.channels.get(slot.stage.name)
        slot.outputs = [self.channels[reader.name] for reader in self.spec.readers(slot.stage.name)]
        try:
            if slot.slot_fd is None:  # EMFILE here is a spawn failure like any other
                keeps_batch = slot.input is not None and slot.stage.redeliver
                slot.slot_fd = transport.slot.create(transport.slot.MESSAGE_CAPACITY if keeps_batch else 0)
            python = self.environment.python if self.environment is not None else None
            start_method = self.spec.start_method
            if python is not None and slot.stage.function is None:
                start_method = "fork"  # a command stage's bridge is procd's code alone: no environment
            if start_method == "forkserver" and self.forkserver is None:
                self.forkserver = start_forkserver(f"procd: {self.spec.name} forkserver", python)
                self.log.info("forkserver_started", pid=self.forkserver.pid)
            pid = slots.start(
                slot,
                server=self.forkserver,
                python=python,
                pipeline=self.spec.name,
                base_dir=self.spec.base_dir,
                state_dir=self.spec.state_dir,
                start_method=start_method,
                input_endpoint=slot.input.endpoint() if slot.input is not None else None,
                outputs=tuple(Output(c.endpoint(), c.spec.batch, c.stage) for c in slot.outputs),
            )
        except OSError as exc:
            self._bound(slot).error("spawn_failed", errno=exc.errno, error=exc.strerror)
            slot.failure = f"fork failed: {exc.strerror}"
            self.histories[slot.stage.name].record(self.clock())  # a failed start counts as a restart
            self._feed(slot, SpawnFailed(exc.errno or 0))
            self._after_end(slot, slot.failure)
            return
        if slot.generation > 1:
            self.histories[slot.stage.name].record(self.clock())
            slot.restarts += 1
        slot.started_at = self.clock()
        self.by_pid[pid] = slot
        if self.environment is not None and slot.stage.function is not None:
            self.env_of[pid] = self.environment
        if slot.input is not None:
            slot.input.readers.add(pid)
        for channel in slot.outputs:
            channel.writers.add(pid)
        assert slot.report_fd is not None and slot.output_fd is not None
        self.selector.register(slot.report_fd, selectors.EVENT_READ, ("report", slot))
        self.selector.register(slot.output_fd, selectors.EVENT_READ, ("output", slot))
        self._bound(slot).info("worker_spawned", title=f"procd: {self.spec.name}/{slot.name}")
        self._feed(slot, Spawned(pid))

    def _signal(self, slot: WorkerSlot, signum: int, *, group: bool = True) -> None:
        if slot.pid is None:
            return
        if signum == signal.SIGKILL:
            slot.forced = True
            if self.second_stop is not None:
                forced_by, after = "second_signal", f"after {self._kill_cause()}"
            else:
                forced_by, after = "stop_timeout", f"{self.spec.stop_timeout_s:g}s after the stop request"
            self._bound(slot).warning(
                "stop_escalated",
                forced_by=forced_by,
                message=f"{slot.name} still running {after}; sending SIGKILL to its process group",
            )
        try:
            if group:
                os.killpg(slot.pid, signum)
            else:
                os.kill(slot.pid, signum)
        except ProcessLookupError:
            pass

    # -- inputs from the kernel and the children ---------------------------------------------------

    def _on_signals(self, received: list[int]) -> None:
        for signum in dict.fromkeys(received):  # once each, in order of arrival
            if signum == signal.SIGCHLD:
                for reaped in reaper.reap():
                    self._on_exit(reaped)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._request_stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload("SIGHUP")
            elif signum == signal.SIGUSR1 and self.writer is not None:
                self.writer.reopen()

    def _on_exit(self, reaped: reaper.Reaped) -> None:
        if self.reloading is not None and reaped.pid == self.reloading.check.pid:
            self._reload_checked(reaped)
            return
        if reaped.pid in self.checks_killed:
            self.checks_killed.discard(reaped.pid)
            return
        if self.forkserver is not None and reaped.pid == self.forkserver.pid:
            self.forkserver.close()
            self.forkserver = None
            if not self.stopping:
                self.log.error("forkserver_died", pid=reaped.pid, code=reaped.code, signal=_signal_name(reaped.signal))
                self.failed.append(f"the fork server died ({_signal_name(reaped.signal) or reaped.code})")
                self._request_stop("the fork server died")
            return
        slot = self.by_pid.pop(reaped.pid, None)
        if slot is None:
            self.log.info("orphan_reaped", pid=reaped.pid, code=reaped.code, signal=_signal_name(reaped.signal))
            return
        self._close_pipes(slot)
        if slot.input is not None:
            slot.input.readers.discard(reaped.pid)
        for channel in slot.outputs:
            channel.writers.discard(reaped.pid)
        event = Exited(reaped.code, reaped.signal)
        cause = self._failure(slot, event)
        if cause is not None and event.ok:
            event = Exited(reaped.code, reaped.signal, clean=False)  # restarted by policy, like a crash
        fields: dict[str, Any] = {
            "runtime_s": round(self.clock() - slot.started_at, 3),
            "expected": cause is None,
            **slot.counts,
        }
        if event.signal is not None:
            fields["signal"] = _signal_name(event.signal)
        else:
            fields["code"] = event.code
        if cause is not None:
            fields["cause"] = cause
        bound = self._bound(slot)
        (bound.info if cause is None else bound.error)("worker_exited", **fields)
        if self.clock() - slot.started_at > slot.stage.restart.within_s:
            slot.failures = 0  # it stayed up: the next backoff starts from the beginning
        slot.pid = None  # reaped: the number may be reused by any process from now on
        self._feed(slot, event)
        self._check_held(slot, event)
        if slot.retiring and slot.state in TERMINAL:
            self._remove(slot)
            return
        if slot.regrouping and slot.state in TERMINAL:
            self._restart_group_when_ended()
            return
        self._after_end(slot, cause)
        if slot.state is State.BACKOFF and slot.stage.strategy == "rest_for_one":
            self._stop_group(slot)

    def _check_held(self, slot: WorkerSlot, event: Exited) -> None:
        """After a process ended: give back the queue capacity its slot file says it may have
        held; if it held a batch, its slot's next process will deliver it again."""
        if slot.slot_fd is None:
            return
        held = transport.slot.read(slot.slot_fd)
        if held.in_token and slot.input is not None:
            slot.input.reclaim()
        if 0 <= held.out_token < len(slot.outputs):
            slot.outputs[held.out_token].reclaim()
        transport.slot.clear_tokens(slot.slot_fd)
        if not held.holds:
            return
        transport.slot.note_exit(slot.slot_fd, event.signal, event.code)
        pending = held.items - max(held.index, 0)
        if slot.state in (State.BACKOFF, State.STARTING) or slot.regrouping:
            self._bound(slot).warning(
                "item_redelivered", items=pending, attempt=held.deliveries + 1, reason=event.describe()
            )
        else:
            self._bound(slot).error(
                "batch_abandoned",
                items=pending,
                message=f"{slot.name} died holding {pending} items and will not be restarted",
            )

    def _name_holders(self, name: str) -> None:
        """An input was ended a while ago and its readers still run: name any process that is not
        a worker and holds its writing end (its readers cannot see the end until it lets go)."""
        channel = self.channels.get(name)
        if channel is None or name in self.finished or not channel.readers:
            return
        holders = [pid for pid in channel.holders() if pid not in self.by_pid and pid != os.getpid()]
        if holders:
            self.log.warning(
                "input_held_open",
                stage=name,
                holders=holders,
                titles=[procinfo.title(pid) for pid in holders],
                message=(
                    f"the input of {name} has ended, but process {', '.join(map(str, holders))} still holds its "
                    "writing end (a child forked by stage code?); its readers wait until that process exits"
                ),
            )

    def _remove(self, slot: WorkerSlot) -> None:
        """A retired slot leaves for good."""
        self.slots.remove(slot)
        self.ready.discard(slot)
        self.throttles.pop(slot, None)
        if slot.slot_fd is not None:
            os.close(slot.slot_fd)
            slot.slot_fd = None

    def _stop_group(self, failed: WorkerSlot) -> None:
        """rest_for_one: the failed stage's other workers and every stage downstream of it stop
        (readers finish their batch) and start again, upstream first, once all have ended."""
        stages = {failed.stage.name} | {
            s.name for s in self.spec.stages if failed.stage.name in plan.upstream_closure(self.spec, s.name)
        }
        group = [
            s
            for s in self.slots
            if s.stage.name in stages
            and s is not failed
            and s.state in (State.STARTING, State.RUNNING)
            and not s.retiring
            and not s.regrouping
        ]
        self.log.warning(
            "group_restart",
            stage=failed.stage.name,
            strategy="rest_for_one",
            workers=[s.name for s in group],
            message=f"{failed.name} failed; restarting {', '.join(s.name for s in group) or 'nothing else'}",
        )
        for slot in group:
            slot.regrouping = True
            self.regrouping.append(slot)
            self._feed(slot, StopRequested() if slot.stage.is_producer else RetireRequested())

    def _restart_group_when_ended(self) -> None:
        if self.stopping or any(s.state not in TERMINAL for s in self.regrouping):
            return
        order = {stage.name: i for i, stage in enumerate(plan.topological_order(self.spec))}
        group, self.regrouping = self.regrouping, []
        for member in sorted(group, key=lambda s: (order[s.stage.name], s.index)):
            member.regrouping = False
            self._feed(member, StartRequested())

    def _after_end(self, slot: WorkerSlot, cause: str | None) -> None:
        """After a process ended (or never started): a restart is on its way, or the stage gave
        up, or a failure stops the pipeline."""
        if slot.state is State.BACKOFF:
            return
        if slot.state is State.FATAL:
            spec = slot.stage.restart
            restarts = self.histories[slot.stage.name].count(self.clock())
            self.log.error(
                "stage_fatal",
                stage=slot.stage.name,
                restarts=restarts,
                max=spec.max,
                within_s=spec.within_s,
                message=(
                    f"{slot.stage.name} restarted {restarts} times within {spec.within_s:g}s "
                    f"(max {spec.max}); giving up"
                ),
            )
            cause = f"stage {slot.stage.name} is fatal after {restarts} restarts within {spec.within_s:g}s"
        if cause is not None:
            self.failed.append(f"{slot.name}: {cause}")
            self._request_stop(f"{slot.name} failed: {cause}")

    def _failure(self, slot: WorkerSlot, event: Exited) -> str | None:
        """Why this exit is a failure, or None when it is the end procd expected."""
        if slot.forced:
            return f"killed by SIGKILL after {self._kill_cause()}"
        if slot.state is State.STOPPING and (event.ok or event.signal == signal.SIGTERM):
            return None  # it ended because we asked it to
        if event.ok:
            if slot.input is not None and not slot.input.ended:
                return "exited before the end of its input"
            if self._holds_batch(slot):
                return "exited holding a batch it had not handed on"  # exit 0 must mean nothing lost
            if slot.input is not None and not self._saw_input_end(slot):
                return "exited before the end of its input"  # what is still queued would be lost
            return None
        return slot.failure or f"exited with {event.describe()}"

    def _read_reports(self, slot: WorkerSlot) -> None:
        for line in self._read_lines(slot, "report"):
            try:
                report = json.loads(line)
                kind = report.pop("kind")
            except (ValueError, KeyError, AttributeError):
                self._bound(slot).warning("worker_report_invalid", line=line[:_LINE_LIMIT])
                continue
            bound = self._bound(slot)
            if kind == "ready":
                self.ready.add(slot)
                self._feed(slot, Ready())
                if not self.ready_logged and len(self.ready) == len(self.slots):
                    self.ready_logged = True
                    self.log.info("pipeline_ready", workers=len(self.slots))
                    self._notify(READY=1, STATUS=self._status_line())
            elif kind == "error":
                slot.failure = f"{report.get('error_type')}: {report.get('error')}"
                bound.error("worker_error", **report)
            elif kind == "exec_failed":
                slot.exec_failed = True
                slot.failure = f"cannot execute {report.get('program')}: {report.get('error')}"
                bound.error("spawn_failed", **report)
            elif kind == "counts":
                slot.counts = {k: int(v) for k, v in report.items()}
                self.ledger.observe(slot)
                self.ledger.sample(self.slots, self.clock())
                self._show_progress()
            elif kind == "dead_lettered":
                self.dead_letters[slot.stage.name] = self.dead_letters.get(slot.stage.name, 0) + 1
                bound.warning("item_dead_lettered", **report)
            else:
                bound.warning("worker_report_invalid", line=line[:_LINE_LIMIT])

    def _read_output(self, slot: WorkerSlot) -> None:
        """Each line the worker printed is a ``worker_output`` record, as far as its budget goes
        (``throttle``); the rest is counted and reported once a second, and when it ends."""
        now = self.clock()
        throttle = self.throttles.get(slot)
        if throttle is None:
            throttle = self.throttles[slot] = OutputThrottle(now)
        lines = self._read_raw_lines(slot, "output")
        logged = throttle.admit(lines, now)
        if logged:
            bound = self._bound(slot)
            for raw in lines[:logged]:
                bound.info("worker_output", line=raw.decode("utf-8", errors="replace"))
        due = throttle.report_due()
        if due is not None and (due <= now or slot.output_fd is None):
            self._report_suppressed(slot, throttle, now)
        elif due is not None:
            self.deadlines["output"] = min(self.deadlines.get("output", due), due)

    def _report_suppressed(self, slot: WorkerSlot, throttle: OutputThrottle, now: float) -> None:
        taken = throttle.take(now)
        if taken is None:
            return
        self._bound(slot).warning(
            "worker_output_suppressed",
            lines=taken.lines,
            bytes=taken.bytes,
            over_s=round(taken.until_s - taken.since_s, 3),
            message=(
                f"{taken.lines} lines of output not logged: a worker's output is logged up to "
                f"{throttle.burst} lines at once, then {throttle.rate_per_s:g} a second"
            ),
        )

    def _report_suppressed_due(self) -> None:
        """The ``output`` deadline: report what each quiet or flooding worker had suppressed."""
        now = self.clock()
        for slot, throttle in list(self.throttles.items()):
            due = throttle.report_due()
            if due is not None and due <= now:
                self._report_suppressed(slot, throttle, now)
        pending = [d for t in self.throttles.values() if (d := t.report_due()) is not None]
        if pending:
            self.deadlines["output"] = min(pending)

    def _read_lines(self, slot: WorkerSlot, which: str) -> list[str]:
        """Read what is there without blocking; return complete lines (all of them at EOF)."""
        return [raw.decode("utf-8", errors="replace") for raw in self._read_raw_lines(slot, which)]

    def _read_raw_lines(self, slot: WorkerSlot, which: str) -> list[bytes]:
        """``_read_lines``, undecoded: a flood of output is counted, not decoded."""
        fd = slot.report_fd if which == "report" else slot.output_fd
        if fd is None:
            return []
        buffer = slot.report_buffer if which == "report" else slot.output_buffer
        eof = False
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            buffer += chunk
        *lines, rest = buffer.split(b"\n")
        while len(rest) > _LINE_LIMIT:  # a line without an end must not grow for ever: cut it
            lines.append(rest[:_LINE_LIMIT])
            rest = rest[_LINE_LIMIT:]
        if eof and rest:
            lines.append(rest)
            rest = b""
        if which == "report":
            slot.report_buffer = rest
        else:
            slot.output_buffer = rest
        if eof:
            self.selector.unregister(fd)
            os.close(fd)
            if which == "report":
                slot.report_fd = None
            else:
                slot.output_fd = None
        return lines

    def _close_pipes(self, slot: WorkerSlot) -> None:
        """A reaped worker has written all it will: read the rest, then close (a grandchild that
        still holds a pipe must not keep it open)."""
        self._read_reports(slot)
        self._read_output(slot)
        for which in ("report", "output"):
            fd = slot.report_fd if which == "report" else slot.output_fd
            if fd is not None:
                self.selector.unregister(fd)
                os.close(fd)
        slot.report_fd = slot.output_fd = None


class _Pipes:
    """The slot driver's ``selector.register(fd, READ, (which, slot))`` and ``unregister(fd)`` on
    the loop: a worker's report and output pipes, until the driver watches them itself."""

    def __init__(self, on: loop.Loop, reports: Callable[[WorkerSlot], None], output: Callable[[WorkerSlot], None]):
        self.loop, self.readers = on, {"report": reports, "output": output}

    def register(self, fd: int, _events: int, data: tuple[str, WorkerSlot]) -> None:
        read, slot = self.readers[data[0]], data[1]
        self.loop.watch(fd, lambda _ready: read(slot))

    def unregister(self, fd: int) -> None:
        self.loop.forget(fd)


def _signal_name(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
