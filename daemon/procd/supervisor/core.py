"""The supervisor: one single-threaded event loop over every worker of one pipeline.

It waits in one ``select`` whose timeout is the nearest deadline (no fixed poll interval) on: the
signal wake-up pipe, and each worker's report and output pipes. Child exits are collected by
``reaper.reap`` alone. Every change of a slot's state goes through ``lifecycle.step``; this module
carries out the actions it returns and logs each fact as a lifecycle record.

End of stream: the supervisor holds a copy of each queue's writing end until every stage that
feeds the queue has finished (all its processes exited); dropping that copy is what lets the
readers see the end of their input. A stop sends SIGTERM to the producers and lets every other
stage drain in the same way; whatever is still there at the stop deadline gets SIGKILL.

The same loop answers the control socket (one handler per command of ``control.COMMANDS``),
serves the optional metrics endpoint (both through bounded ``connections``), and tells the
service manager what happens (sd_notify). Signals and control requests lead to the same
internal events.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import random
import select
import selectors
import signal
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procd import config, plan, procctl, procinfo, reaper, signals, transport
from procd.config import PipelineSpec
from procd.context import Output
from procd.errors import ConfigError, Problem, StoreError
from procd.launch.forkserver import ForkServer
from procd.launch.spawn import start_forkserver
from procd.lifecycle import (
    Action,
    ArmTimer,
    BackoffElapsed,
    CancelTimer,
    DrainRequested,
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
from procd.ops import control, status
from procd.ops.connections import PAUSE_S, Connection, Listener
from procd.ops.control import Client, ControlError, ControlServer, default_path
from procd.ops.notify import Notifier
from procd.restarts import RestartHistory, backoff_delay
from procd.supervisor import loop, slots
from procd.supervisor.slots import WorkerSlot
from procd.throttle import OutputThrottle
from procd.transport import Input

# Annotations only: the metrics classes are imported by a pipeline that serves metrics, and
# importing structlog's typing module would load all of structlog, asyncio included, before
# log.open_logger can defer it.
# The environment builder and the reload check (with hashlib and libcrypto, subprocess) are
# imported where a reload or a pipeline with packages needs them, not into every supervisor and
# the workers forked from it (bench/README.md, "Start-up").
if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from procd.launch import reloadcheck
    from procd.launch.environment import BuildError, Environment
    from procd.ops.metrics import HttpClient, MetricsServer

TERMINAL = (State.EXITED, State.FATAL)
# Processes that scale and reload start at once at most, then per second: a request for many
# processes forks them over a while instead of all in one turn of the loop.
SPAWN_BURST = 16
SPAWN_RATE_PER_S = 64.0
# After an input's end of stream, how long before procd looks for processes that are not workers
# and still hold its writing end (a stage's forked child), which keep its readers waiting.
_HELD_OPEN_AFTER_S = 1.0
_LINE_LIMIT = 4096

TimerKey = tuple[WorkerSlot, Timer]


@dataclasses.dataclass
class _Reloading:
    """A reload whose check of the new file runs (``reloadcheck``); its reply waits for it."""

    check: reloadcheck.Check
    source: str
    reply: control.Deferred
    timeout_s: float


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
        self.retired_envs: list[Environment] = []  # replaced by a reload; held while workers run in them
        self.control_path = control_path or default_path(spec.name)
        self.started_at = clock()
        self.log = log
        self.writer = writer
        self.clock = clock
        self.rand = rand
        self.histories = {s.name: RestartHistory(s.restart.max, s.restart.within_s) for s in spec.stages}
        self.slots = [
            WorkerSlot(stage, i)
            for stage in plan.topological_order(spec)
            if spec.runs_here(stage.name)
            for i in range(stage.processes)
        ]
        self.by_pid: dict[int, WorkerSlot] = {}
        self.channels: dict[str, Input] = {}  # each stage's current input
        self.retired: list[Input] = []  # inputs replaced by a reload, still draining
        # stages whose every process has ended (those another host runs: from the start, here)
        self.finished: set[str] = {s.name for s in spec.stages if not spec.runs_here(s.name)}
        self.transport_down: set[str] = set()  # inputs whose shared backend cannot be reached now
        self.timers: dict[TimerKey, float] = {}
        self.ready: set[WorkerSlot] = set()
        self.ready_logged = False
        self.regrouping: list[WorkerSlot] = []  # stopped for a rest_for_one restart, started once all have ended
        self.notifier = notifier or Notifier(None, None)
        self.deadlines: dict[str, float] = {}  # the loop's own: "watchdog", "status", "output", "starts"
        self.status_sent = ("", 0.0)  # the last STATUS= line and when it went
        self.ledger = status.Ledger(self.started_at)  # stage totals and rates, for every view
        self.notify_failed = False
        self.dead_letters: dict[str, int] = {}
        self.throttles: dict[WorkerSlot, OutputThrottle] = {}  # each worker slot's output budget
        self.forkserver: ForkServer | None = None  # started on first need (start_method = "forkserver")
        self.stopping = False
        self.stop_deadline = 0.0
        self.second_stop: str | None = None  # the signal that asked to stop a second time
        self.start_queue: list[WorkerSlot] = []  # started by scale or reload, waiting for their turn
        self.spawn_tokens = float(SPAWN_BURST)
        self.tokens_at = clock()
        self.failed: list[str] = []
        self.stop_reason: str | None = None  # the first stop request's
        self.selector = selectors.DefaultSelector()
        self.listeners: dict[Listener, str] = {}  # the control socket and the metrics endpoint
        self.watched: set[Listener] = set()  # those in the selector (a paused one is not)
        self.connections: dict[Connection, Listener] = {}
        self.reloading: _Reloading | None = None  # a reload waiting for its check
        self.checks_killed: set[int] = set()  # processes of a check killed at its deadline, to reap
        self.handlers: dict[str, control.Handler] = {  # one per command of control.COMMANDS
            "status": lambda _request: {"ok": True, **self.status()},
            "stop": self._stop_command,
            "reload": lambda _request: self.reload("control socket"),
            "scale": lambda request: self._scale(request.args["stage"], request.args["processes"]),
            "attach": lambda request: self._attach(request.args["stage"]),
            "replayed": self._replayed,
        }
        control.check_handlers(self.handlers)

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Start every stage, supervise until every process has ended, return the exit code.

        Raises:
            ControlError: the control socket cannot be created (another procd runs this pipeline).
        """
        server = ControlServer(self.control_path)
        try:
            metrics = None
            if self.spec.metrics:
                from procd.ops.metrics import MetricsServer  # only a pipeline that asks serves metrics

                metrics = MetricsServer(*self.spec.metrics)
        except OSError as exc:
            server.close()
            address = config.format_address(self.spec.metrics) if self.spec.metrics else "?"
            raise ControlError(f"cannot listen for metrics on {address}: {exc.strerror}") from None
        procctl.set_title(f"procd: {self.spec.name} supervisor")
        procctl.become_subreaper()
        wake = signals.open_wakeup()
        self.selector.register(wake.read_fd, selectors.EVENT_READ, ("wake", None))
        self.listeners[server] = "control"
        if metrics is not None:
            self.listeners[metrics] = "metrics"
        self._tend_connections()
        try:
            for stage in self.spec.stages:
                writing = [u for u in stage.inputs if self.spec.runs_here(u)]
                if not stage.is_producer and (writing or self.spec.runs_here(stage.name)):
                    self.channels[stage.name] = self._create_input(stage, writing, wake)
            if any(channel.housekeeping_s() for channel in self.channels.values()):
                self.deadlines["transport"] = self.clock()
            self.log.info(
                "pipeline_starting",
                stages=[s.name for s in self.spec.stages],
                workers=len(self.slots),
                start_method=self.spec.start_method,
                supervisor_pid=os.getpid(),
                control=self.control_path,
            )
            if self.notifier.watchdog_interval_s:
                self.deadlines["watchdog"] = self.clock()
            for slot in reversed(self.slots):  # readers first, so no writer waits on a missing one
                self._feed(slot, StartRequested())
            trim_due = True
            while not all(_ended(slot) for slot in self.slots):
                timeout = self._timeout()
                if timeout is None and trim_due:
                    # about to sleep with nothing scheduled: give the heap that the last burst
                    # of work freed back to the kernel (about 16 us; an idle supervisor stays small)
                    procctl.release_free_memory()
                    trim_due = False
                ready = self.selector.select(loop.wait_s(self.clock, timeout))
                loop.waited(self.clock, timeout, bool(ready))  # a test's clock jumps to the deadline
                for key, mask in ready:
                    trim_due = True
                    kind, source = key.data
                    if kind == "wake":
                        self._on_signals(wake.drain())
                    elif kind == "report":
                        self._read_reports(source)
                    elif kind == "output":
                        self._read_output(source)
                    elif kind == "control":
                        self._accept(source)
                    elif kind == "metrics":
                        self._accept_http(source)
                    elif kind == "http":
                        self._serve_http(source, mask)
                    elif kind == "check":
                        self._read_check(source)
                    else:
                        self._serve(source, mask)
                self._fire_timers()
                self._tend_connections()
                self._update_stages()
                if self.retired_envs:
                    self._release_environments()
                self._update_status()
            return self._finish()
        finally:
            self._abandon_reload("procd is ending")
            self._sweep()
            for connection in self.connections:
                connection.close()
            server.close()
            if metrics is not None:
                metrics.close()
            wake.close()
            self.selector.close()
            for channel in [*self.channels.values(), *self.retired]:
                channel.close()
            for slot in self.slots:
                if slot.slot_fd is not None:
                    os.close(slot.slot_fd)

    def _timeout(self) -> float | None:
        deadlines = [*self.timers.values(), *self.deadlines.values()]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock())

    def _fire_timers(self) -> None:
        now = self.clock()
        if self.deadlines.get("watchdog", now + 1) <= now:
            self._notify(WATCHDOG=1)  # sent from the loop itself: a stuck loop sends nothing
            assert self.notifier.watchdog_interval_s is not None
            self.deadlines["watchdog"] = now + self.notifier.watchdog_interval_s
        if self.deadlines.get("status", now + 1) <= now:
            del self.deadlines["status"]
            self._update_status()
        if self.deadlines.get("output", now + 1) <= now:
            del self.deadlines["output"]
            self._report_suppressed_due()
        if self.deadlines.get("starts", now + 1) <= now:
            self._start_paced([])
        if self.deadlines.get("reload", now + 1) <= now:
            self._reload_timed_out()
        if self.deadlines.get("transport", now + 1) <= now:
            self._housekeep_inputs()
        for held in [k for k, due in self.deadlines.items() if k.startswith("held:") and due <= now]:
            del self.deadlines[held]
            self._name_holders(held.removeprefix("held:"))
        for key, deadline in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if deadline > now or key not in self.timers:
                continue
            del self.timers[key]
            slot, timer = key
            self._feed(slot, StopTimedOut() if timer is Timer.KILL else BackoffElapsed())

    # -- shared transports (redis) -------------------------------------------------------------------

    def _create_input(self, stage: config.StageSpec, writing: list[str], wake: signals.WakeUp) -> Input:
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
                if stage.name not in self.transport_down:
                    self.transport_down.add(stage.name)
                    self.log.error("transport_unavailable", stage=stage.name, error=str(exc), retry_in_s=delay)
                ready, _, _ = select.select([wake.read_fd], [], [], delay)
                if ready and {signal.SIGTERM, signal.SIGINT} & set(wake.drain()):
                    raise transport.Unavailable(f"{exc}; stopped while waiting for it", final=True) from None
                delay = min(delay * 2, 5.0)
                continue
            if stage.name in self.transport_down:
                self.transport_down.discard(stage.name)
                self.log.info("transport_restored", stage=stage.name)
            return made

    def _housekeep_inputs(self) -> None:
        """A shared backend's heartbeat; an outage and the return are each said once."""
        now = self.clock()
        intervals = []
        for channel in [*self.channels.values(), *self.retired]:
            interval = channel.housekeeping_s()
            if interval is None or channel.ended:
                continue
            intervals.append(interval)
            try:
                channel.housekeep()
            except transport.Unavailable as exc:
                if channel.stage not in self.transport_down:
                    self.transport_down.add(channel.stage)
                    self.log.error("transport_unavailable", stage=channel.stage, error=str(exc))
                continue
            if channel.stage in self.transport_down:
                self.transport_down.discard(channel.stage)
                self.log.info("transport_restored", stage=channel.stage)
        if intervals:
            # while the server is away, look again soon: the heartbeat is what keeps this host's
            # writers counted as alive by the other hosts
            self.deadlines["transport"] = now + (1.0 if self.transport_down else min(intervals))
        else:
            self.deadlines.pop("transport", None)

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

    # -- the service manager (sd_notify) ------------------------------------------------------------

    def _notify(self, **fields: str | int) -> None:
        try:
            self.notifier.send(**fields)
        except OSError as exc:
            self._notify_failed(exc)

    def _notify_reloading(self) -> None:
        try:
            self.notifier.reloading()
        except OSError as exc:
            self._notify_failed(exc)

    def _notify_failed(self, exc: OSError) -> None:
        if not self.notify_failed:  # once: the service manager may simply be gone
            self.notify_failed = True
            self.log.warning("notify_failed", error=exc.strerror, socket=self.notifier.address)

    def _rate(self) -> tuple[status.Totals, float]:
        totals = self.ledger.totals(self.slots)
        return totals, status.sink_rate(self.spec, self.ledger.rates(totals, self.clock())[0])

    def _status_line(self) -> str:
        """One line for ``systemctl status``: stages, workers, items/s, restarts."""
        return status.summary_line(self.spec, self.slots, self._rate()[1])

    def _show_progress(self) -> None:
        """On a terminal: items through each stage, and the rate, under the records."""
        if self.writer is not None and self.writer.on_terminal:
            totals, per_s = self._rate()
            self.writer.progress(status.progress_line(self.spec, totals, per_s))

    def _update_status(self) -> None:
        """Send STATUS= when the line changed, at most once a second."""
        if not self.notifier.enabled or not self.ready_logged or self.stopping:
            return
        line = self._status_line()
        last, when = self.status_sent
        if line == last:
            return
        now = self.clock()
        if now - when < 1.0:
            self.deadlines.setdefault("status", when + 1.0)
            return
        self.status_sent = (line, now)
        self._notify(STATUS=line)

    # -- the control socket and the metrics endpoint --------------------------------------------------

    def _accept(self, server: ControlServer) -> None:
        now = self.clock()
        client, refused = server.accept(now)
        if refused is not None:
            self.log.warning("control_refused", peer_pid=refused["pid"], peer_uid=refused["uid"])
        self._accepted(server, client, "client", now)

    def _accept_http(self, server: MetricsServer) -> None:
        now = self.clock()
        self._accepted(server, server.accept(now), "http", now)

    def _accepted(self, listener: Listener, connection: Connection | None, kind: str, now: float) -> None:
        if connection is not None:
            self.connections[connection] = listener
            self.selector.register(connection.fileno(), selectors.EVENT_READ, (kind, connection))
        elif listener.paused_until > now:
            self.log.warning(
                "connections_paused",
                endpoint=self.listeners[listener],
                message=f"no descriptor to spare for a new connection; accepting again in {PAUSE_S:g}s",
            )

    def _serve(self, client: Client, mask: int) -> None:
        """Answer the requests a client sent, as long as it reads the replies."""
        now = self.clock()
        if mask & selectors.EVENT_READ and not client.closing and not client.receive(now):
            self._drop(client)
            return
        while True:
            while client.pending is None and not client.full and not client.closing:
                request = client.next_request()
                if request is None:
                    break
                answer = self._answer(request)
                if isinstance(answer, control.Deferred):
                    client.pending = answer  # its later requests wait for this reply
                    answer.then(functools.partial(self._deferred_reply, client))
                else:
                    client.reply(answer)
            done = client.flush(now)
            if not done or client.full or client.closing or client.pending or b"\n" not in client.inbox:
                break
        if done and client.closing:
            self._drop(client)
            return
        reading = 0 if client.full or client.closing or client.pending else selectors.EVENT_READ
        self.selector.modify(client.fileno(), reading | (0 if done else selectors.EVENT_WRITE), ("client", client))

    def _deferred_reply(self, client: Client, reply: control.Reply) -> None:
        """A reply that was deferred is known: send it, then serve what the client sent since."""
        if client not in self.connections:
            return  # dropped meanwhile
        client.pending = None
        client.reply(reply)
        self._serve(client, 0)

    def _serve_http(self, client: HttpClient, mask: int) -> None:
        now = self.clock()
        if mask & selectors.EVENT_READ and not client.closing:
            path = client.read_request(now)
            if path is None:
                self._drop(client)
                return
            if path:
                client.respond(path, self.status())
        if client.closing:
            if client.flush(now):
                self._drop(client)
            else:
                self.selector.modify(client.fileno(), selectors.EVENT_WRITE, ("http", client))

    def _drop(self, connection: Connection) -> None:
        self.selector.unregister(connection.fileno())
        connection.close()
        self.connections.pop(connection).release()

    def _tend_connections(self) -> None:
        """Drop connections idle past their deadline (a peer that does not read its replies
        among them); watch each listener only while it accepts; keep the next such moment."""
        now = self.clock()
        for connection in [c for c in self.connections if c.deadline <= now]:
            self.log.info(
                "connection_dropped",
                endpoint=self.listeners[self.connections[connection]],
                unsent_bytes=len(connection.outbox),
                message=f"no progress for {connection.patience_s:g}s"
                + ("; the peer does not read its replies" if connection.outbox else ""),
            )
            self._drop(connection)
        for listener, kind in self.listeners.items():
            accepting = listener.accepting(now)
            if accepting and listener not in self.watched:
                self.selector.register(listener.fileno(), selectors.EVENT_READ, (kind, listener))
                self.watched.add(listener)
            elif not accepting and listener in self.watched:
                self.selector.unregister(listener.fileno())
                self.watched.discard(listener)
        moments = [c.deadline for c in self.connections if math.isfinite(c.deadline)]  # not one owed a reply
        moments += [listener.paused_until for listener in self.listeners if listener.paused_until > now]
        if moments:
            self.deadlines["connections"] = min(moments)
        else:
            self.deadlines.pop("connections", None)

    def _answer(self, request: control.Request | str) -> control.Answer:
        """The reply to one request; signals and requests lead to the same internal events."""
        try:
            return control.dispatch(request, self.handlers)
        except Exception as exc:  # a fault of procd's own: told to the client, never fatal
            name = request.command.name if isinstance(request, control.Request) else None
            self.log.error("control_failed", command=name, error=repr(exc), traceback=traceback.format_exc())
            return {"ok": False, "error": f"procd failed to answer {name}: {exc!r}"}

    def _stop_command(self, _request: control.Request) -> dict[str, Any]:
        self._request_stop("stop requested over the control socket")
        return {"ok": True, "stopping": True}

    def _replayed(self, request: control.Request) -> dict[str, Any]:
        self.log.info("items_replayed", **request.args)
        return {"ok": True}

    def _attach(self, name: object) -> tuple[dict[str, Any], tuple[int, ...]]:
        """Hand a client the writing end of a stage's input (``procd dlq replay``). The stage's
        end of stream then also waits for that client to close it."""
        channel = self.channels.get(name) if isinstance(name, str) else None
        if channel is None:
            readers = sorted(self.channels)
            return {
                "ok": False,
                "error": f"no stage {name!r} with an input; stages with one are {', '.join(readers)}",
            }, ()
        if channel.ended or self.stopping:
            return {"ok": False, "error": f"the input of stage {name} has ended; it takes no more items"}, ()
        self.log.info("input_attached", stage=name)
        fields, fds = channel.attach()
        return {"ok": True, "stage": name, "batch": channel.spec.batch, "slots": channel.spec.slots, **fields}, fds

    def status(self) -> dict[str, Any]:
        """Every stage and worker as ``procd status`` shows them."""
        now = self.clock()
        reply = status.snapshot(
            self.spec,
            self.slots,
            self.channels,
            self.ledger,
            finished=self.finished,
            dead_letters=self.dead_letters,
            stopping=self.stopping,
            uptime_s=now - self.started_at,
            now=now,
        )
        reply["transport_unavailable"] = sorted(self.transport_down)  # inputs whose server is away
        return reply

    def _scale(self, name: object, processes: object) -> dict[str, Any]:
        """Start or retire only the difference; retired readers finish their batch first.

        Never more than the pipeline's process ceiling, and the new processes start at the pace of
        ``_start_paced``: one request cannot make the loop fork thousands at once. A producer is
        scaled only if it takes a ``shard``: its processes are then all replaced, each new one with
        its share of the new count (another copy of an unsharded producer would yield every item
        again).
        """
        names = [s.name for s in self.spec.stages]
        if name not in names:
            return {"ok": False, "error": f"unknown stage {name!r}; stages are {', '.join(names)}"}
        ceiling = self.spec.process_ceiling
        if not isinstance(processes, int) or isinstance(processes, bool) or not 1 <= processes <= ceiling:
            shown = processes if not isinstance(processes, int) or processes < 10**12 else f"{str(processes)[:12]}…"
            return {
                "ok": False,
                "error": f"processes must be an integer from 1 to {ceiling} (pipeline.max_processes), got {shown}",
            }
        if self.stopping or name in self.finished:
            return {"ok": False, "error": f"stage {name} is no longer running"}
        stage = self.spec.stage(str(name))
        live = [s for s in self.slots if s.stage.name == name and s.state not in TERMINAL and not s.retiring]
        others = sum(1 for s in self.slots if s.stage.name != name and s.state not in TERMINAL and not s.retiring)
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
        started, retiring = [], []
        if processes > len(live):
            used = {s.index for s in self.slots if s.stage.name == name}
            free = (i for i in itertools.count() if i not in used)
            position = max(i for i, s in enumerate(self.slots) if s.stage.name == name) + 1
            started = [WorkerSlot(stage, next(free)) for _ in range(processes - len(live))]
            self.slots[position:position] = started
        for slot in sorted(live, key=lambda s: s.index)[processes:]:
            slot.retiring = True
            retiring.append(slot)
        self.log.info(
            "stage_scaled",
            stage=name,
            processes_from=len(live),
            processes_to=processes,
            started=[s.index for s in started],
            retiring=[s.index for s in retiring],
        )
        for slot in retiring:
            self._feed(slot, RetireRequested())
            if slot.state in TERMINAL:  # it had no process (waiting to restart, or to start)
                self._remove(slot)
        waiting = self._start_paced(started)
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
        if not stage.shardable:
            return {
                "ok": False,
                "error": (
                    f"stage {stage.name} is a producer: another process would yield every item again; "
                    'a producer that accepts a "shard" parameter and keeps no checkpoint can be scaled (see the README)'
                ),
            }
        if processes == len(live):
            return {
                "ok": True,
                "stage": stage.name,
                "processes": processes,
                "started": [],
                "retiring": [],
                "waiting": 0,
            }
        resharded = dataclasses.replace(stage, processes=processes)
        new = dataclasses.replace(
            self.spec, stages=tuple(resharded if s.name == stage.name else s for s in self.spec.stages)
        )
        leaving, arriving = self._apply(new, plan.reload_plan(self.spec, new, self.finished))
        self.log.info(
            "stage_scaled",
            stage=stage.name,
            processes_from=len(live),
            processes_to=processes,
            started=[s.index for s in arriving],
            retiring=[s.index for s in leaving],
            resharded=True,
        )
        return {
            "ok": True,
            "stage": stage.name,
            "processes": processes,
            "started": [s.index for s in arriving],
            "retiring": [s.index for s in leaving],
            "waiting": sum(1 for s in arriving if s.state is State.STOPPED),
            "resharded": True,
        }

    def _start_paced(self, slots: list[WorkerSlot]) -> int:
        """Start ``slots`` at most ``SPAWN_BURST`` at once and ``SPAWN_RATE_PER_S`` after that (a
        token bucket); return how many still wait. A waiting slot shows as ``stopped``; one
        retired or stopped meanwhile is not started."""
        self.start_queue.extend(slots)
        now = self.clock()
        self.spawn_tokens = min(SPAWN_BURST, self.spawn_tokens + (now - self.tokens_at) * SPAWN_RATE_PER_S)
        self.tokens_at = now
        while self.start_queue and self.spawn_tokens >= 1:
            slot = self.start_queue.pop(0)
            if slot in self.slots and slot.state is State.STOPPED and not self.stopping and not slot.retiring:
                self.spawn_tokens -= 1
                self._feed(slot, StartRequested())
        if self.start_queue:
            self.deadlines["starts"] = now + (1 - self.spawn_tokens) / SPAWN_RATE_PER_S
        else:
            self.deadlines.pop("starts", None)
        return len(self.start_queue)

    # -- stages, end of stream, stop ---------------------------------------------------------------

    def _update_stages(self) -> None:
        """Mark stages whose processes have all ended; close the inputs that have no writer left."""
        for stage in self.spec.stages:
            if stage.name in self.finished:
                continue
            slots = [s for s in self.slots if s.stage.name == stage.name]
            if all(_ended(s) for s in slots):
                self.finished.add(stage.name)
                items_in, items_out = self.ledger.totals(self.slots).get(stage.name, (0, 0))
                self.log.info("stage_drained", stage=stage.name, items_in=items_in, items_out=items_out)
        for name, channel in self.channels.items():
            if not channel.ended and all(upstream in self.finished for upstream in self.spec.stage(name).inputs):
                channel.end()
                self.deadlines[f"held:{name}"] = self.clock() + _HELD_OPEN_AFTER_S
        for channel in list(self.retired):
            if not channel.ended and not channel.writers:
                channel.end()
            if channel.drained():
                channel.close()
                self.retired.remove(channel)

    def reload(self, source: str) -> control.Answer:
        """Re-read the pipeline file and apply the difference once its stage code is checked.

        Stages whose effective configuration is unchanged keep their processes. A changed stage's
        processes are replaced (readers finish their batch first); a new stage starts; a removed
        one drains and goes. A stage's wiring is part of its configuration: a stage that gains or
        loses a reader, or whose reader's queue is replaced, is restarted to write to the right
        queues. An invalid file changes nothing. A finished stage is not started again.

        The check of the stage code (imports, an environment's build) runs in a child that the
        loop watches (``reloadcheck``): the reply is deferred until it ends, and the loop serves
        everything else meanwhile. A check that takes longer than ``pipeline.reload_timeout``
        is killed and fails the reload; one reload runs at a time.
        """
        self.log.info("reload_requested", source=source)
        if self.stopping:
            return {"ok": False, "error": "the pipeline is stopping"}
        if self.reloading is not None:
            return {
                "ok": False,
                "error": (
                    f"a reload is under way already (requested by {self.reloading.source}); try again once it has ended"
                ),
            }
        self._notify_reloading()
        try:
            new, problems = config.read_pipeline(self.spec.file)
        except ConfigError as error:
            return self._reloaded(self._reload_invalid(error))
        if problems and new.has_environment:  # a file with problems builds nothing
            return self._reloaded(self._reload_invalid(ConfigError(self.spec.file, problems)))
        timeout_s = self.spec.reload_timeout_s
        from procd.launch import reloadcheck

        try:
            # the child's own waits are longer: the loop's deadline is what ends a check
            check = reloadcheck.start(new, problems, f"procd: {self.spec.name} reload check", 2 * timeout_s + 1)
        except OSError as exc:
            self.log.error("reload_failed", cause="fork", error=exc.strerror, message="still running unchanged")
            return self._reloaded({"ok": False, "error": f"cannot start the check: {exc.strerror}; nothing changed"})
        self.reloading = _Reloading(check, source, control.Deferred(), timeout_s)
        self.selector.register(check.fd, selectors.EVENT_READ, ("check", check))
        self.deadlines["reload"] = self.clock() + timeout_s
        return self.reloading.reply

    def _reloaded(self, reply: dict[str, Any]) -> dict[str, Any]:
        """A reload has ended, with ``reply``: the service manager hears READY again."""
        self._notify(READY=1, STATUS=self._status_line())
        return reply

    def _read_check(self, check: reloadcheck.Check) -> None:
        if self.reloading is None or self.reloading.check is not check:
            return  # ended earlier in this turn of the loop
        if not check.read():  # its end of the pipe has closed: its exit (SIGCHLD) comes next
            self.selector.unregister(check.fd)

    def _end_check(self) -> _Reloading:
        """Forget the running check (its descriptor closed, its deadline gone); return it."""
        assert self.reloading is not None
        pending, self.reloading = self.reloading, None
        self.deadlines.pop("reload", None)
        if pending.check.fd in self.selector.get_map():
            self.selector.unregister(pending.check.fd)
        return pending

    def _reload_checked(self, reaped: reaper.Reaped) -> None:
        """The check has exited: apply the reload, answer it."""
        assert self.reloading is not None
        ended = f"exit code {reaped.code}" if reaped.signal is None else str(_signal_name(reaped.signal))
        outcome = self.reloading.check.outcome(ended)
        pending = self._end_check()
        pending.check.close()
        if self.stopping:
            reply: dict[str, Any] = {"ok": False, "error": "the pipeline is stopping; nothing changed"}
        else:
            reply = self._reload(outcome)
        pending.reply.resolve(self._reloaded(reply))

    def _reload_timed_out(self) -> None:
        """The check has run past ``pipeline.reload_timeout``: kill it, fail the reload."""
        pending = self._end_check()
        self.checks_killed |= pending.check.kill()
        pending.check.close()
        what = f"checking the new pipeline file did not finish within {pending.timeout_s:g}s (pipeline.reload_timeout)"
        self.log.error(
            "reload_failed",
            cause="timeout",
            timeout_s=pending.timeout_s,
            source=pending.source,
            message=f"{what}; still running unchanged",
        )
        pending.reply.resolve(self._reloaded({"ok": False, "error": f"{what}; nothing changed"}))

    def _abandon_reload(self, why: str) -> None:
        """A stop (or the end of procd) while a check runs: kill it, answer the reload."""
        if self.reloading is None:
            return
        pending = self._end_check()
        self.checks_killed |= pending.check.kill()
        pending.check.close()
        self.log.warning("reload_failed", cause="stopping", source=pending.source, message=f"{why}; reload abandoned")
        pending.reply.resolve({"ok": False, "error": f"{why}; the reload was abandoned, nothing changed"})

    def _reload_invalid(self, error: ConfigError) -> dict[str, Any]:
        self.log.error("config_invalid", file=self.spec.file, problems=error.lines(), message="still running unchanged")
        return {"ok": False, "error": "the pipeline file is invalid; nothing changed", "problems": error.lines()}

    def _build_failed(self, error: BuildError) -> dict[str, Any]:
        self.log.error(
            "environment_build_failed",
            project=error.project,
            error=str(error),
            output_tail=error.tail,
            message="still running unchanged",
        )
        return {"ok": False, "error": f"{error}; nothing changed", "output_tail": error.tail}

    def _reload(self, outcome: reloadcheck.Outcome) -> dict[str, Any]:
        """Apply what the check found (``reload``)."""
        if outcome.build_error is not None:
            return self._build_failed(outcome.build_error)
        new, problems = outcome.spec, outcome.problems
        if new.name != self.spec.name:
            problems.append(Problem("pipeline.name", f'cannot change while running (it is "{self.spec.name}")'))
        if self.spec.here is not None:  # the host runs the same stages (procd run --stages)
            new, selection = config.select_stages(new, sorted(self.spec.here))
            problems.extend(selection)
        if problems:
            return self._reload_invalid(ConfigError(self.spec.file, problems))
        new_env = None
        if outcome.prepared is not None:
            from procd.launch import environment
            from procd.launch.environment import BuildError

            try:
                # complete since the check prepared it: this takes this process's claim on it
                new_env = environment.prepare(new, tick=self._ping_while_blocked)
            except BuildError as error:
                return self._build_failed(error)
            new_env = dataclasses.replace(new_env, built=outcome.prepared.built, seconds=outcome.prepared.seconds)
        old_env = self.environment
        switching = (old_env.key if old_env else None) != (new_env.key if new_env else None)
        rebuilt = {s.name for s in self.spec.stages if s.function is not None} if switching else set()
        diff = plan.reload_plan(self.spec, new, self.finished, rebuilt)
        if switching:
            self.environment = new_env  # the workers started from now on run in it
            self._close_forkserver()  # it forks from the old interpreter; the next spawn starts another
        try:
            self._apply(new, diff)
        except StoreError as exc:
            self.environment = old_env
            if new_env is not None:
                new_env.release()
            self.log.error(
                "config_invalid", file=self.spec.file, problems=[str(exc)], message="still running unchanged"
            )
            return {"ok": False, "error": "a new queue cannot be made; nothing changed", "problems": [str(exc)]}
        if switching:
            self._retire_environment(old_env, new_env, outcome.prepared.projects if outcome.prepared else ())
        elif new_env is not None:
            new_env.release()  # the same environment: this process's first claim on it stands
        self.log.info(
            "pipeline_reloaded",
            changed=sorted(diff.changed),
            code_changed=sorted(diff.code_changed),
            added=sorted(diff.added),
            removed=sorted(diff.removed),
            unchanged=sorted(diff.unchanged),
            not_restarted_finished=sorted(diff.finished),
        )
        return {
            "ok": True,
            "changed": sorted(diff.changed),
            "code_changed": sorted(diff.code_changed),
            "added": sorted(diff.added),
            "removed": sorted(diff.removed),
            "unchanged": sorted(diff.unchanged),
        }

    def _apply(self, new: PipelineSpec, diff: plan.ReloadPlan) -> tuple[list[WorkerSlot], list[WorkerSlot]]:
        """Make ``new`` the running pipeline: the changed and removed stages' processes leave
        (readers finish their batch), the changed and added stages' start (paced); return both.

        Raises:
            StoreError: a new durable queue cannot be made (then nothing has changed).
        """
        changed, added, removed, replaced_queues = diff.changed, diff.added, diff.removed, diff.replaced_queues
        fresh: dict[str, Input] = {}
        try:
            for name in added | (changed & replaced_queues):
                if not new.stage(name).is_producer:
                    fresh[name] = transport.create(name, new.stage(name).queue)
        except StoreError:
            for channel in fresh.values():
                channel.close()
            raise
        self.spec = new
        for stage in new.stages:
            self.histories.setdefault(stage.name, RestartHistory(stage.restart.max, stage.restart.within_s))
        for name in removed | (changed & replaced_queues):
            leaving_channel = self.channels.pop(name) if name in self.channels else None
            if leaving_channel is not None:
                leaving_channel.current = False
                self.retired.append(leaving_channel)
        self.channels.update(fresh)

        leaving = [s for s in self.slots if s.stage.name in removed | changed and s.state not in TERMINAL]
        generations = {(s.stage.name, s.index): s.generation for s in self.slots}
        arriving = [
            WorkerSlot(stage, i, generation=generations.get((stage.name, i), 0))
            for stage in plan.topological_order(new)
            if stage.name in added | changed
            for i in range(stage.processes)
        ]
        self.slots = [s for s in self.slots if s.stage.name not in removed | changed or s in leaving] + arriving
        self.finished -= changed
        for slot in leaving:
            slot.retiring = True
            if slot.stage.is_producer:
                self._feed(slot, StopRequested())
            elif slot.input is not None and not slot.input.current:
                self._feed(slot, DrainRequested())  # its queue is going: read it to the end
            else:
                self._feed(slot, RetireRequested())  # its queue stays: the new readers go on
            if slot.state in TERMINAL:
                self._remove(slot)
        self._start_paced(list(reversed(arriving)))
        return leaving, arriving

    def _ping_while_blocked(self) -> None:
        """Claiming the environment the reload's check prepared takes only its lock, unless it
        was removed in between and is built again here, in the loop: the service manager's
        watchdog must still hear from procd then."""
        if self.notifier.watchdog_interval_s:
            self._notify(WATCHDOG=1)

    def _close_forkserver(self) -> None:
        if self.forkserver is not None:
            self.forkserver.close()  # it exits when its socket closes; the reaper collects it
            self.forkserver = None

    def _retire_environment(self, old: Environment | None, new: Environment | None, projects: tuple[str, ...]) -> None:
        """Record the switch to ``new``; ``old`` is kept until no worker runs in it any more
        (``_release_environments``)."""
        if new is not None:
            self.log.info(
                "environment_built" if new.built else "environment_reused",
                path=new.path,
                projects=list(projects),
                seconds=round(new.seconds, 3),
            )
        if old is not None:
            self.retired_envs.append(old)

    def _release_environments(self) -> None:
        """Give up every replaced environment no worker runs in any more, and remove it."""
        self.env_of = {pid: env for pid, env in self.env_of.items() if pid in self.by_pid}
        in_use = {id(env) for env in self.env_of.values()}
        for env in [e for e in self.retired_envs if id(e) not in in_use]:
            self.retired_envs.remove(env)
            env.release()
            from procd.launch import environment

            keep = self.environment.key if self.environment is not None else ""
            for path in environment.remove_unused(self.spec, keep=keep):
                self.log.info("environment_removed", path=path)

    def _kill_cause(self) -> str:
        """What made a stop kill: a second stop request, or the stop timeout."""
        if self.second_stop is not None:
            return f"a second stop request ({self.second_stop})"
        return f"the stop timeout ({self.spec.stop_timeout_s:g}s)"

    def _request_stop(self, reason: str) -> None:
        if self.stopping:
            if reason in ("SIGTERM", "SIGINT") and self.second_stop is None:
                self.second_stop = reason
                self.log.warning(
                    "stop_requested",
                    reason=reason,
                    message=f"second stop request ({reason}); killing every worker now",
                )
                self.stop_deadline = self.clock()
                for key in list(self.timers):
                    if key[1] is Timer.KILL:
                        self.timers[key] = self.stop_deadline
            return
        self.stopping = True
        self.stop_reason = reason
        self._abandon_reload("the pipeline is stopping")
        self._notify(STOPPING=1, STATUS=f"stopping: {reason}")
        self.stop_deadline = self.clock() + self.spec.stop_timeout_s
        self.log.info("stop_requested", reason=reason, stop_timeout_s=self.spec.stop_timeout_s)
        for slot in self.slots:
            self._feed(slot, StopRequested() if slot.stage.is_producer else DrainRequested())

    def _finish(self) -> int:
        forced = [s.name for s in self.slots if s.forced]
        code = 1 if self.failed or forced else 0
        totals = {"queued_batches": 0, "queued_items_at_most": 0, "in_hand_items": 0}
        for stage, counts in self._abandoned().items():
            if any(counts.values()):
                self.log.warning(
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
        # finished: every stage ended by itself; stopped: a stop request (signal or control
        # socket) and a clean drain; failed: a failure, or a drain that had to be forced
        outcome = "failed" if code else "stopped" if self.stopping else "finished"
        self.log.info(
            "pipeline_stopped",
            exit_code=code,
            outcome=outcome,
            stop_reason=self.stop_reason,
            failures=self.failed,
            forced=forced,
            forced_by=self._kill_cause() if forced else None,
            abandoned=totals,
        )
        return code

    def _abandoned(self) -> dict[str, dict[str, int]]:
        """Per stage, once every process has ended: the batches left in its input queue (with the
        most items they can hold) and the items its slots still hold (from the slot files'
        headers: nothing is unpickled)."""
        found: dict[str, dict[str, int]] = {}
        for stage in self.spec.stages:
            channel = self.channels.get(stage.name)
            queued = (_queued_batches(channel) or 0) if channel is not None else 0
            held = [
                transport.slot.read(s.slot_fd)
                for s in self.slots
                if s.stage.name == stage.name and s.slot_fd is not None
            ]
            found[stage.name] = {
                "queued_batches": queued,
                "queued_items_at_most": queued * stage.queue.batch,
                "in_hand_items": sum(h.items - max(h.index, 0) for h in held if h.holds),
            }
        return found

    def _sweep(self) -> None:
        """Nothing left running: SIGKILL any process group of ours that still has a member, and
        reap what that frees."""
        waiting = set(self.by_pid) | self.checks_killed  # and a reload's check killed at a stop
        if self.forkserver is not None:
            self.forkserver.close()  # the server ends when its socket does
            waiting.add(self.forkserver.pid)
        for pid in self.by_pid:  # only processes not yet reaped: a reaped pid may be someone else's now
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


def _queued_batches(channel: Input) -> int | None:
    """Batches waiting in a stage's input (None when that cannot be read)."""
    return channel.depth()


def _ended(slot: WorkerSlot) -> bool:
    """No process, and none to come (a slot stopped for a group restart will start again)."""
    return slot.state in TERMINAL and not slot.regrouping


def _signal_name(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
