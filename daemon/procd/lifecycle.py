"""The process lifecycle: states, events, actions and the one transition table.

A leaf module. ``step`` is pure: it maps the state of one worker slot and an event to a new state
and a tuple of actions (data, not effects); the supervisor carries the actions out. Every pair the
supervisor may feed is spelled out in ``_TABLE``, including the ones that do nothing, so the whole
state machine is testable without a process. A pair that is missing is a bug, reported with the
state, the event and the events that state accepts.

Discussion: a restart decision needs the stage's restart history (how many restarts within the
window), which is not a property of one slot. The caller computes that and passes it in as
``Policy``; the table stays a function of its arguments alone.

The events and actions are ``frozen.frozen_dataclass`` classes: defining them compiles nothing.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable

from procd.errors import TransitionError
from procd.frozen import frozen_dataclass


class State(enum.StrEnum):
    """The words ``procd status`` and the logs use for a worker slot."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    BACKOFF = "backoff"
    FATAL = "fatal"


class Restart(enum.StrEnum):
    """When a worker that exited is started again."""

    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@frozen_dataclass(frozen=True)
class Policy:
    """What the caller knows about restarting this slot right now."""

    restart: Restart = Restart.NO
    intensity_exceeded: bool = False


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


@frozen_dataclass(frozen=True)
class Ready:
    """The child finished its set-up (imports, exec) and is processing."""


@frozen_dataclass(frozen=True)
class Exited:
    """The process was reaped: exactly one of ``code`` and ``signal`` is set."""

    code: int | None = None
    signal: int | None = None
    # False: it exited 0 but that is a failure of the worker all the same (it ended before its
    # input did, or holding a batch it had not handed on); the supervisor decides.
    clean: bool = True

    @property
    def ok(self) -> bool:
        """True for exit status 0, unless that exit was not clean."""
        return self.code == 0 and self.clean

    def describe(self) -> str:
        """Return ``code 3`` or ``signal SIGKILL``."""
        if self.signal is not None:
            try:
                return f"signal {signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        return f"code {self.code}"


@frozen_dataclass(frozen=True)
class StopRequested:
    """Stop now: the process is sent SIGTERM (producers, or an operator's stop)."""


@frozen_dataclass(frozen=True)
class RetireRequested:
    """Finish the batch in hand, then exit (scale-down): SIGTERM to the process alone."""


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
    | Exited
    | StopRequested
    | RetireRequested
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


Action = Spawn | Signal | ArmTimer | CancelTimer


@frozen_dataclass(frozen=True)
class Transition:
    """The outcome of one step."""

    state: State
    actions: tuple[Action, ...] = ()


Handler = Callable[[State, Event, Policy], Transition]


def _to(state: State, *actions: Action) -> Handler:
    """A handler that always goes to ``state`` with ``actions``."""
    return lambda _state, _event, _policy: Transition(state, actions)


def _stay(state: State, _event: Event, _policy: Policy) -> Transition:
    """Nothing happens."""
    return Transition(state)


def _after_exit(_state: State, event: Event, policy: Policy) -> Transition:
    """Decide between exited, backoff and fatal for a process that ended on its own."""
    assert isinstance(event, (Exited, SpawnFailed))
    failed = not (isinstance(event, Exited) and event.ok)
    wants = policy.restart is Restart.ALWAYS or (policy.restart is Restart.ON_FAILURE and failed)
    if not wants:
        return Transition(State.EXITED)
    if policy.intensity_exceeded:
        return Transition(State.FATAL)
    return Transition(State.BACKOFF, (ArmTimer(Timer.RESTART),))


_TERM = Signal(signal.SIGTERM)
_TERM_ALONE = Signal(signal.SIGTERM, group=False)
_KILL = Signal(signal.SIGKILL)

_TABLE: dict[tuple[State, type], Handler] = {
    # stopped: nothing runs yet
    (State.STOPPED, StartRequested): _to(State.STARTING, Spawn()),
    (State.STOPPED, StopRequested): _to(State.EXITED),
    (State.STOPPED, DrainRequested): _to(State.EXITED),
    (State.STOPPED, RetireRequested): _to(State.EXITED),
    # starting: fork done or about to be, child not ready yet
    (State.STARTING, Spawned): _stay,
    (State.STARTING, SpawnFailed): _after_exit,
    (State.STARTING, Ready): _to(State.RUNNING),
    (State.STARTING, Exited): _after_exit,
    (State.STARTING, StopRequested): _to(State.STOPPING, _TERM, ArmTimer(Timer.KILL)),
    (State.STARTING, DrainRequested): _to(State.STOPPING, ArmTimer(Timer.KILL)),
    (State.STARTING, RetireRequested): _to(State.STOPPING, _TERM_ALONE, ArmTimer(Timer.KILL)),
    (State.STARTING, StartRequested): _stay,
    # running
    (State.RUNNING, Ready): _stay,
    (State.RUNNING, Exited): _after_exit,
    (State.RUNNING, StopRequested): _to(State.STOPPING, _TERM, ArmTimer(Timer.KILL)),
    (State.RUNNING, DrainRequested): _to(State.STOPPING, ArmTimer(Timer.KILL)),
    (State.RUNNING, RetireRequested): _to(State.STOPPING, _TERM_ALONE, ArmTimer(Timer.KILL)),
    (State.RUNNING, StartRequested): _stay,
    # stopping: asked to end, deadline armed
    (State.STOPPING, Ready): _stay,
    (State.STOPPING, Exited): _to(State.EXITED, CancelTimer(Timer.KILL)),
    (State.STOPPING, StopRequested): _stay,
    (State.STOPPING, DrainRequested): _stay,
    (State.STOPPING, RetireRequested): _stay,
    (State.STOPPING, StopTimedOut): _to(State.STOPPING, _KILL),
    (State.STOPPING, StartRequested): _stay,
    # backoff: waiting to start again
    (State.BACKOFF, BackoffElapsed): _to(State.STARTING, Spawn()),
    (State.BACKOFF, StopRequested): _to(State.EXITED, CancelTimer(Timer.RESTART)),
    (State.BACKOFF, DrainRequested): _to(State.EXITED, CancelTimer(Timer.RESTART)),
    (State.BACKOFF, RetireRequested): _to(State.EXITED, CancelTimer(Timer.RESTART)),
    (State.BACKOFF, StartRequested): _stay,
    # exited: ended, may be started again (restart of a group, reload)
    (State.EXITED, StartRequested): _to(State.STARTING, Spawn()),
    (State.EXITED, StopRequested): _stay,
    (State.EXITED, DrainRequested): _stay,
    (State.EXITED, RetireRequested): _stay,
    # fatal: gave up
    (State.FATAL, StopRequested): _stay,
    (State.FATAL, DrainRequested): _stay,
    (State.FATAL, RetireRequested): _stay,
    (State.FATAL, StartRequested): _stay,
}


_NO_RESTART = Policy()


def step(state: State, event: Event, policy: Policy = _NO_RESTART) -> Transition:
    """Apply one event to one worker slot.

    Args:
        state: the slot's current state.
        event: what happened.
        policy: the restart policy and whether the stage's restart intensity is used up.

    Returns:
        The new state and the actions to carry out, in order.

    Raises:
        TransitionError: the pair is not in the table.
    """
    handler = _TABLE.get((state, type(event)))
    if handler is None:
        allowed = sorted(e.__name__ for (s, e) in _TABLE if s is state)
        raise TransitionError(
            f"no transition for event {type(event).__name__} in state {state}; that state accepts {', '.join(allowed)}"
        )
    return handler(state, event, policy)


def accepted(state: State) -> frozenset[type]:
    """Return the event types ``state`` has an entry for (for tests and error messages)."""
    return frozenset(e for (s, e) in _TABLE if s is state)
