"""The process lifecycle: states, events, actions and the one transition table.

A core module (it imports only ``errors``, ``frozen`` and ``restarts``). ``step`` is pure: it maps
the ``Life`` of one worker slot (its state and the flags kept with it) and an event to a new
``Life`` and a tuple of actions (data, not effects); the supervisor carries the actions out. Every
pair the supervisor may feed is spelled out in ``_TABLE``, including the ones that do nothing, so
the whole state machine is testable without a process. A pair that is missing is a bug, reported
with the state, the event and the events that state accepts.

Every decision about a slot is taken here, in the manner of s6's ``actions[state][event]``:
whether an exit is a failure and why, restart or not (the stop, a retiring slot, a program that
cannot be executed, an input that ended with or without a held batch), backoff or fatal, what
becomes of a held batch, a retire, a rest_for_one regroup and the group's restart, a forced stop,
and whether a failure fails the pipeline. The supervisor gathers facts into the events (an exit
carries where its input stood and whether its slot file held a batch) and never sets a flag.

Discussion: a restart decision needs the stage's restart history (how many restarts within the
window) and the pipeline's stop, which are not properties of one slot. The caller computes those
and passes them in as ``Policy``; the table stays a function of its arguments alone. Which slots
form a rest_for_one group is the caller's too (it needs the pipeline's graph): the table says
when to regroup, and each member decides for itself whether it has a process to stop.

The events and actions are ``frozen.frozen_dataclass`` classes: defining them compiles nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import signal
from collections.abc import Callable

from procd.errors import TransitionError
from procd.frozen import frozen_dataclass
from procd.restarts import Restart


class State(enum.StrEnum):
    """The words ``procd status`` and the logs use for a worker slot."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    BACKOFF = "backoff"
    FATAL = "fatal"


# No process, and none on its way unless the slot is started again.
TERMINAL = (State.EXITED, State.FATAL)


@frozen_dataclass(frozen=True)
class Policy:
    """What the caller knows around this slot right now: the stage's restart policy and history,
    and the pipeline's stop."""

    restart: Restart = Restart.NO
    intensity_exceeded: bool = False
    stopping: bool = False  # the pipeline is stopping: nothing starts again
    rest_for_one: bool = False  # a restart takes the stage's group down and up with it
    within_s: float = math.inf  # restart.within: a process that ran longer starts the backoff afresh
    kill_cause: str = "the stop timeout"  # what made a stop kill (for the cause of a forced exit)


class InputEnd(enum.StrEnum):
    """Where a process that exited stood with its input (from its queue and its slot file)."""

    NONE = "none"  # it has no input (a producer)
    OPEN = "open"  # its input had not ended
    ENDED = "ended"  # its input had ended, but the process had not received that end
    SEEN = "seen"  # the process received its input's end of stream


class Leave(enum.StrEnum):
    """How a process is asked to end when its slot retires or regroups."""

    AT_ONCE = "at once"  # SIGTERM to its process group (a producer)
    AFTER_BATCH = "after its batch"  # SIGTERM to the process alone: it finishes the batch in hand
    AT_END = "at the end of its input"  # no signal, no deadline: it reads its input (a queue that is going) to the end


@frozen_dataclass(frozen=True)
class Life:
    """A slot's state and the flags the table keeps with it: all the table decides from and about
    one slot. Only ``step`` makes a new one; the supervisor keeps the last one it returned."""

    state: State = State.STOPPED
    failure: str | None = None  # what went wrong with the current process, as it or its fork said
    exec_failed: bool = False  # its program cannot be executed: starting it again will not help
    forced: bool = False  # its process was sent SIGKILL at a stop's deadline
    retiring: bool = False  # scaled away or replaced: leaves the pipeline once it has no process
    regrouping: bool = False  # stopped for a rest_for_one restart: starts again with its group
    failures: int = 0  # consecutive, for the backoff; reset by a run longer than restart.within


# -- events: facts, named in the past tense ---------------------------------------------------


@frozen_dataclass(frozen=True)
class StartRequested:
    """The slot should run a process."""


@frozen_dataclass(frozen=True)
class Spawned:
    """fork() returned a pid for the slot."""

    pid: int


@frozen_dataclass(frozen=True)
class SpawnFailed:
    """fork() itself failed; there is no process."""

    errno: int
    error: str = ""


@frozen_dataclass(frozen=True)
class Ready:
    """The child finished its set-up (imports, exec) and is processing."""


@frozen_dataclass(frozen=True)
class ErrorReported:
    """The process reported an error (stage code raised): the cause of its exit, if it fails."""

    cause: str


@frozen_dataclass(frozen=True)
class ExecFailureReported:
    """The process reported that its program cannot be executed."""

    cause: str


@frozen_dataclass(frozen=True)
class Exited:
    """The process was reaped: exactly one of ``code`` and ``signal`` is set, with what the
    supervisor knew of its input and its slot file at that moment."""

    code: int | None = None
    signal: int | None = None
    runtime_s: float = 0.0
    input: InputEnd = InputEnd.NONE
    held_batch: bool = False  # its slot file says it held a batch it had not handed on
    # its stage keeps no batch (redeliver = false, a queue that does not outlive procd), and its
    # slot file says it had received one and not asked for the next: a failure loses that batch
    untracked_batch: bool = False

    @property
    def ok(self) -> bool:
        """True for exit status 0."""
        return self.code == 0

    def describe(self) -> str:
        """Return ``code 3`` or ``signal SIGKILL``."""
        if self.signal is not None:
            return f"signal {signal_name(self.signal)}"
        return f"code {self.code}"


def signal_name(signum: int) -> str:
    """``SIGKILL``; the number, for one that has no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


@frozen_dataclass(frozen=True)
class StopRequested:
    """Stop now: the process is sent SIGTERM (producers, or an operator's stop)."""


@frozen_dataclass(frozen=True)
class RetireRequested:
    """The slot leaves the pipeline (scale-down, reload): its process ends as ``leave`` says."""

    leave: Leave = Leave.AFTER_BATCH


@frozen_dataclass(frozen=True)
class RegroupRequested:
    """rest_for_one: another slot of the group failed; a running process ends as ``leave`` says
    and the slot starts again with its group."""

    leave: Leave = Leave.AFTER_BATCH


@frozen_dataclass(frozen=True)
class DrainRequested:
    """Stop once the input has ended: no signal, the process exits at end of stream."""


@frozen_dataclass(frozen=True)
class StopTimedOut:
    """The stop deadline passed and the process is still there."""


@frozen_dataclass(frozen=True)
class BackoffElapsed:
    """The restart delay is over."""


Event = (
    StartRequested
    | Spawned
    | SpawnFailed
    | Ready
    | ErrorReported
    | ExecFailureReported
    | Exited
    | StopRequested
    | RetireRequested
    | RegroupRequested
    | DrainRequested
    | StopTimedOut
    | BackoffElapsed
)


# -- actions: what the supervisor must do --------------------------------------------------------


class Timer(enum.StrEnum):
    """The deadlines a slot can have armed."""

    KILL = "kill"
    RESTART = "restart"


@frozen_dataclass(frozen=True)
class Spawn:
    """Fork a new process for the slot."""


@frozen_dataclass(frozen=True)
class Signal:
    """Send a signal to the slot's process group, or to its process alone."""

    signum: int
    group: bool = True


@frozen_dataclass(frozen=True)
class ArmTimer:
    """Start a deadline; its length is the caller's (stop timeout, backoff delay)."""

    timer: Timer


@frozen_dataclass(frozen=True)
class CancelTimer:
    """Forget a deadline."""

    timer: Timer


@frozen_dataclass(frozen=True)
class KeepBatch:
    """The process died holding a batch: the slot's next process delivers it again."""


@frozen_dataclass(frozen=True)
class AbandonBatch:
    """The process died holding a batch, and no process of this slot will deliver it."""


@frozen_dataclass(frozen=True)
class Regroup:
    """rest_for_one: stop the rest of this slot's group (its stage and every stage downstream)."""


@frozen_dataclass(frozen=True)
class Rejoin:
    """A regrouped slot has ended: start its group again once every member has."""


@frozen_dataclass(frozen=True)
class Remove:
    """The retired slot has no process any more: it leaves the pipeline."""


@frozen_dataclass(frozen=True)
class GiveUp:
    """The stage's restart intensity is used up (fatal): the pipeline stops and fails."""


@frozen_dataclass(frozen=True)
class Fail:
    """A failure that is not restarted: the pipeline stops and fails with ``cause``."""

    cause: str


Action = Spawn | Signal | ArmTimer | CancelTimer | KeepBatch | AbandonBatch | Regroup | Rejoin | Remove | GiveUp | Fail


@frozen_dataclass(frozen=True)
class Transition:
    """The outcome of one step: the slot's new life, the actions to carry out in order, and for
    an exit, why it was a failure (None: the end procd expected)."""

    life: Life
    actions: tuple[Action, ...] = ()
    cause: str | None = None

    @property
    def state(self) -> State:
        """The new state."""
        return self.life.state


Handler = Callable[[Life, Event, Policy], Transition]


def _to(state: State, *actions: Action, retire: bool = False, force: bool = False) -> Handler:
    """A handler that always goes to ``state`` with ``actions`` (marking the slot retiring, or its
    process forced)."""

    def handler(life: Life, _event: Event, _policy: Policy) -> Transition:
        marked = dataclasses.replace(life, state=state, retiring=life.retiring or retire, forced=life.forced or force)
        return Transition(marked, actions)

    return handler


def _stay(life: Life, _event: Event, _policy: Policy) -> Transition:
    """Nothing happens."""
    return Transition(life)


def _no_regroup(life: Life, _event: Event, _policy: Policy) -> Transition:
    """A stop overrides a regroup: the group will not start again."""
    return Transition(dataclasses.replace(life, regrouping=False))


def _start(life: Life, _event: Event, _policy: Policy) -> Transition:
    """A new process, with a record of its own; a retired slot never starts again."""
    if life.retiring:
        return Transition(dataclasses.replace(life, regrouping=False))
    return Transition(Life(State.STARTING, failures=life.failures), (Spawn(),))


def _reported(life: Life, event: Event, _policy: Policy) -> Transition:
    """The process said what went wrong: that is the cause if it fails."""
    assert isinstance(event, (ErrorReported, ExecFailureReported))
    exec_failed = life.exec_failed or isinstance(event, ExecFailureReported)
    return Transition(dataclasses.replace(life, failure=event.cause, exec_failed=exec_failed))


_SENDS = {
    Leave.AT_ONCE: (Signal(signal.SIGTERM),),
    Leave.AFTER_BATCH: (Signal(signal.SIGTERM, group=False),),
    Leave.AT_END: (),
}


def _leave(life: Life, event: Event, _policy: Policy) -> Transition:
    """A process asked to end for a retire or a regroup, with a deadline; one that reads a
    retired queue to its end has none (a whole queue may take longer than the stop timeout, and
    killing it would lose what is left there): a stop gives it the stop's."""
    assert isinstance(event, (RetireRequested, RegroupRequested))
    if isinstance(event, RetireRequested):
        life = dataclasses.replace(life, state=State.STOPPING, retiring=True)
    else:
        life = dataclasses.replace(life, state=State.STOPPING, regrouping=True)
    deadline = () if event.leave is Leave.AT_END else (ArmTimer(Timer.KILL),)
    return Transition(life, (*_SENDS[event.leave], *deadline))


def _stop_while_leaving(life: Life, _event: Event, _policy: Policy) -> Transition:
    """A stop comes to a process that is leaving already: the stop's deadline (an earlier one of
    its own stands), and a regroup is overridden (the group will not start again)."""
    return Transition(dataclasses.replace(life, regrouping=False), (ArmTimer(Timer.KILL),))


def _cause(life: Life, event: Exited, policy: Policy) -> str | None:
    """Why this exit is a failure, or None when it is the end procd expected."""
    if life.forced:
        return f"killed by SIGKILL after {policy.kill_cause}"
    if life.state is State.STOPPING and (event.ok or event.signal == signal.SIGTERM):
        return None  # it ended because it was asked to
    if event.ok:
        if event.input is InputEnd.OPEN:
            return "exited before the end of its input"
        if event.held_batch:
            return "exited holding a batch it had not handed on"  # exit 0 must mean nothing lost
        if event.input is InputEnd.ENDED:
            return "exited before the end of its input"  # what is still queued would be lost
        return None
    return life.failure or f"exited with {event.describe()}"


def _exited(life: Life, event: Event, policy: Policy) -> Transition:
    """A process ended: classify the exit, then decide what follows."""
    assert isinstance(event, Exited)
    cause = _cause(life, event, policy)
    if event.runtime_s > policy.within_s:
        life = dataclasses.replace(life, failures=0)  # it stayed up: the next backoff starts afresh
    if life.state is State.STOPPING:
        then = _settle(dataclasses.replace(life, state=State.EXITED), cause, event.held_batch, CancelTimer(Timer.KILL))
    else:
        ended = event.input in (InputEnd.ENDED, InputEnd.SEEN)
        then = _after_end(life, cause, event.held_batch, policy, input_ended=ended, regroups=True)
    if event.untracked_batch and cause is not None:  # nothing can deliver it again (a clean end handed it on)
        then = dataclasses.replace(then, actions=(AbandonBatch(), *then.actions))
    return then


def _spawn_failed(life: Life, event: Event, policy: Policy) -> Transition:
    """fork() failed: a failure like a crash at once (and a restart counted by the caller)."""
    assert isinstance(event, SpawnFailed)
    life = dataclasses.replace(life, failure=f"fork failed: {event.error or os.strerror(event.errno)}")
    return _after_end(life, life.failure, False, policy, input_ended=False, regroups=False)


def _after_end(
    life: Life, cause: str | None, held: bool, policy: Policy, *, input_ended: bool, regroups: bool
) -> Transition:
    """Exited, backoff or fatal for a process that ended on its own (or never started).

    Nothing restarts while the pipeline stops, nor a retiring slot, nor a program that cannot be
    executed. A process that ended cleanly after its input had ended is not restarted either (a
    new one would only see the end again); one that held a batch did not end cleanly. A process
    that failed after the end of its input is restarted by the stage's policy: its queue may still
    hold items (a new process that finds it empty ends at once).
    """
    wants = policy.restart is Restart.ALWAYS or (policy.restart is Restart.ON_FAILURE and cause is not None)
    if policy.stopping or life.retiring or life.exec_failed or (cause is None and input_ended):
        wants = False
    if not wants:
        return _settle(dataclasses.replace(life, state=State.EXITED), cause, held)
    if policy.intensity_exceeded:
        return _settle(dataclasses.replace(life, state=State.FATAL), cause, held)
    actions: list[Action] = [ArmTimer(Timer.RESTART)]
    if held:
        actions.append(KeepBatch())
    if regroups and policy.rest_for_one:
        actions.append(Regroup())
    return Transition(dataclasses.replace(life, state=State.BACKOFF, failures=life.failures + 1), tuple(actions), cause)


def _settle(life: Life, cause: str | None, held: bool, *actions: Action) -> Transition:
    """A process ended and none follows now: what becomes of its batch, its slot, the pipeline.

    A slot retired while it regrouped (a reload during a rest_for_one restart) leaves: its batch
    is abandoned with it, and it still rejoins, so that the rest of its group, which may have
    ended already, starts again without it."""
    then = list(actions)
    if held:
        then.append(KeepBatch() if life.regrouping and not life.retiring else AbandonBatch())
    if life.retiring:
        then.append(Remove())
        if life.regrouping:
            then.append(Rejoin())
    elif life.regrouping:
        then.append(Rejoin())
    elif life.state is State.FATAL:
        then.append(GiveUp())
    elif cause is not None:
        then.append(Fail(cause))
    return Transition(life, tuple(then), cause)


_TERM = Signal(signal.SIGTERM)
_KILL = Signal(signal.SIGKILL)
_RESTART_GONE = CancelTimer(Timer.RESTART)

_TABLE: dict[tuple[State, type], Handler] = {
    # stopped: nothing runs yet
    (State.STOPPED, StartRequested): _start,
    (State.STOPPED, StopRequested): _to(State.EXITED),
    (State.STOPPED, DrainRequested): _to(State.EXITED),
    (State.STOPPED, RetireRequested): _to(State.EXITED, Remove(), retire=True),
    (State.STOPPED, RegroupRequested): _stay,
    # starting: fork done or about to be, child not ready yet
    (State.STARTING, Spawned): _stay,
    (State.STARTING, SpawnFailed): _spawn_failed,
    (State.STARTING, Ready): _to(State.RUNNING),
    (State.STARTING, ErrorReported): _reported,
    (State.STARTING, ExecFailureReported): _reported,
    (State.STARTING, Exited): _exited,
    (State.STARTING, StopRequested): _to(State.STOPPING, _TERM, ArmTimer(Timer.KILL)),
    (State.STARTING, DrainRequested): _to(State.STOPPING, ArmTimer(Timer.KILL)),
    (State.STARTING, RetireRequested): _leave,
    (State.STARTING, RegroupRequested): _leave,
    (State.STARTING, StartRequested): _stay,
    # running
    (State.RUNNING, Ready): _stay,
    (State.RUNNING, ErrorReported): _reported,
    (State.RUNNING, ExecFailureReported): _reported,
    (State.RUNNING, Exited): _exited,
    (State.RUNNING, StopRequested): _to(State.STOPPING, _TERM, ArmTimer(Timer.KILL)),
    (State.RUNNING, DrainRequested): _to(State.STOPPING, ArmTimer(Timer.KILL)),
    (State.RUNNING, RetireRequested): _leave,
    (State.RUNNING, RegroupRequested): _leave,
    (State.RUNNING, StartRequested): _stay,
    # stopping: asked to end, deadline armed; a stop overrides a regroup (the group will not start)
    (State.STOPPING, Ready): _stay,
    (State.STOPPING, ErrorReported): _reported,
    (State.STOPPING, ExecFailureReported): _reported,
    (State.STOPPING, Exited): _exited,
    (State.STOPPING, StopRequested): _stop_while_leaving,
    (State.STOPPING, DrainRequested): _stop_while_leaving,
    (State.STOPPING, RetireRequested): _to(State.STOPPING, retire=True),
    (State.STOPPING, RegroupRequested): _stay,
    (State.STOPPING, StopTimedOut): _to(State.STOPPING, _KILL, force=True),
    (State.STOPPING, StartRequested): _stay,
    # backoff: waiting to start again
    (State.BACKOFF, BackoffElapsed): _start,
    (State.BACKOFF, StopRequested): _to(State.EXITED, _RESTART_GONE),
    (State.BACKOFF, DrainRequested): _to(State.EXITED, _RESTART_GONE),
    (State.BACKOFF, RetireRequested): _to(State.EXITED, _RESTART_GONE, Remove(), retire=True),
    (State.BACKOFF, RegroupRequested): _stay,
    (State.BACKOFF, StartRequested): _stay,
    # exited: ended, may be started again (restart of a group, reload)
    (State.EXITED, StartRequested): _start,
    (State.EXITED, StopRequested): _no_regroup,
    (State.EXITED, DrainRequested): _no_regroup,
    (State.EXITED, RetireRequested): _to(State.EXITED, Remove(), retire=True),
    (State.EXITED, RegroupRequested): _stay,
    # fatal: gave up
    (State.FATAL, StopRequested): _stay,
    (State.FATAL, DrainRequested): _stay,
    (State.FATAL, RetireRequested): _to(State.FATAL, Remove(), retire=True),
    (State.FATAL, RegroupRequested): _stay,
    (State.FATAL, StartRequested): _stay,
}


_NO_RESTART = Policy()


def step(life: Life, event: Event, policy: Policy = _NO_RESTART) -> Transition:
    """Apply one event to one worker slot.

    Args:
        life: the slot's current state and flags.
        event: what happened.
        policy: the restart policy, whether the stage's restart intensity is used up, and the
            pipeline's stop.

    Returns:
        The new life, the actions to carry out in order, and an exit's cause.

    Raises:
        TransitionError: the pair is not in the table.
    """
    handler = _TABLE.get((life.state, type(event)))
    if handler is None:
        allowed = sorted(e.__name__ for (s, e) in _TABLE if s is life.state)
        raise TransitionError(
            f"no transition for event {type(event).__name__} in state {life.state}; "
            f"that state accepts {', '.join(allowed)}"
        )
    return handler(life, event, policy)


def accepted(state: State) -> frozenset[type]:
    """Return the event types ``state`` has an entry for (for tests and error messages)."""
    return frozenset(e for (s, e) in _TABLE if s is state)
