"""The transition table, pair by pair, without a process."""

from __future__ import annotations

import signal

import pytest

from procd.errors import TransitionError
from procd.lifecycle import (
    ArmTimer,
    BackoffElapsed,
    CancelTimer,
    DrainRequested,
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
    Transition,
    accepted,
    step,
)

NO = Policy(Restart.NO)
ON_FAILURE = Policy(Restart.ON_FAILURE)
ALWAYS = Policy(Restart.ALWAYS)
EXCEEDED = Policy(Restart.ON_FAILURE, intensity_exceeded=True)
TERM, KILL = Signal(signal.SIGTERM), Signal(signal.SIGKILL)
TERM_ALONE = Signal(signal.SIGTERM, group=False)

CASES = [
    (State.STOPPED, StartRequested(), NO, Transition(State.STARTING, (Spawn(),))),
    (State.STOPPED, StopRequested(), NO, Transition(State.EXITED)),
    (State.STOPPED, DrainRequested(), NO, Transition(State.EXITED)),
    (State.STOPPED, RetireRequested(), NO, Transition(State.EXITED)),
    (State.STARTING, RetireRequested(), NO, Transition(State.STOPPING, (TERM_ALONE, ArmTimer(Timer.KILL)))),
    (State.RUNNING, RetireRequested(), NO, Transition(State.STOPPING, (TERM_ALONE, ArmTimer(Timer.KILL)))),
    (State.STOPPING, RetireRequested(), NO, Transition(State.STOPPING)),
    (State.BACKOFF, RetireRequested(), NO, Transition(State.EXITED, (CancelTimer(Timer.RESTART),))),
    (State.EXITED, RetireRequested(), NO, Transition(State.EXITED)),
    (State.FATAL, RetireRequested(), NO, Transition(State.FATAL)),
    (State.STARTING, Spawned(42), NO, Transition(State.STARTING)),
    (State.STARTING, Ready(), NO, Transition(State.RUNNING)),
    (State.STARTING, SpawnFailed(11), NO, Transition(State.EXITED)),
    (State.STARTING, SpawnFailed(11), ON_FAILURE, Transition(State.BACKOFF, (ArmTimer(Timer.RESTART),))),
    (State.STARTING, Exited(code=127), NO, Transition(State.EXITED)),
    (State.STARTING, Exited(code=127), EXCEEDED, Transition(State.FATAL)),
    (State.STARTING, StopRequested(), NO, Transition(State.STOPPING, (TERM, ArmTimer(Timer.KILL)))),
    (State.STARTING, DrainRequested(), NO, Transition(State.STOPPING, (ArmTimer(Timer.KILL),))),
    (State.STARTING, StartRequested(), NO, Transition(State.STARTING)),
    (State.RUNNING, Ready(), NO, Transition(State.RUNNING)),
    (State.RUNNING, Exited(code=0), NO, Transition(State.EXITED)),
    (State.RUNNING, Exited(code=0), ON_FAILURE, Transition(State.EXITED)),
    (State.RUNNING, Exited(code=0), ALWAYS, Transition(State.BACKOFF, (ArmTimer(Timer.RESTART),))),
    (State.RUNNING, Exited(code=1), NO, Transition(State.EXITED)),
    (State.RUNNING, Exited(signal=9), ON_FAILURE, Transition(State.BACKOFF, (ArmTimer(Timer.RESTART),))),
    (State.RUNNING, Exited(signal=9), EXCEEDED, Transition(State.FATAL)),
    (State.RUNNING, StopRequested(), NO, Transition(State.STOPPING, (TERM, ArmTimer(Timer.KILL)))),
    (State.RUNNING, DrainRequested(), NO, Transition(State.STOPPING, (ArmTimer(Timer.KILL),))),
    (State.RUNNING, StartRequested(), NO, Transition(State.RUNNING)),
    (State.STOPPING, Ready(), NO, Transition(State.STOPPING)),
    (State.STOPPING, Exited(code=0), ALWAYS, Transition(State.EXITED, (CancelTimer(Timer.KILL),))),
    (State.STOPPING, Exited(signal=15), NO, Transition(State.EXITED, (CancelTimer(Timer.KILL),))),
    (State.STOPPING, StopRequested(), NO, Transition(State.STOPPING)),
    (State.STOPPING, DrainRequested(), NO, Transition(State.STOPPING)),
    (State.STOPPING, StopTimedOut(), NO, Transition(State.STOPPING, (KILL,))),
    (State.STOPPING, StartRequested(), NO, Transition(State.STOPPING)),
    (State.BACKOFF, BackoffElapsed(), ON_FAILURE, Transition(State.STARTING, (Spawn(),))),
    (State.BACKOFF, StopRequested(), ON_FAILURE, Transition(State.EXITED, (CancelTimer(Timer.RESTART),))),
    (State.BACKOFF, DrainRequested(), ON_FAILURE, Transition(State.EXITED, (CancelTimer(Timer.RESTART),))),
    (State.BACKOFF, StartRequested(), ON_FAILURE, Transition(State.BACKOFF)),
    (State.EXITED, StartRequested(), NO, Transition(State.STARTING, (Spawn(),))),
    (State.EXITED, StopRequested(), NO, Transition(State.EXITED)),
    (State.EXITED, DrainRequested(), NO, Transition(State.EXITED)),
    (State.FATAL, StopRequested(), NO, Transition(State.FATAL)),
    (State.FATAL, DrainRequested(), NO, Transition(State.FATAL)),
    (State.FATAL, StartRequested(), NO, Transition(State.FATAL)),
]


@pytest.mark.parametrize(("state", "event", "policy", "expected"), CASES, ids=lambda v: str(v)[:40])
def test_every_pair(state: State, event: object, policy: Policy, expected: Transition) -> None:
    assert step(state, event, policy) == expected  # type: ignore[arg-type]


def test_cases_cover_the_whole_table() -> None:
    covered = {(state, type(event)) for state, event, _policy, _expected in CASES}
    table = {(state, event) for state in State for event in accepted(state)}
    assert covered == table


def test_a_missing_pair_names_state_event_and_what_is_allowed() -> None:
    with pytest.raises(TransitionError) as info:
        step(State.EXITED, Exited(code=0))
    message = str(info.value)
    assert "Exited" in message and "exited" in message
    assert "StartRequested" in message and "StopRequested" in message


def test_exit_descriptions() -> None:
    assert Exited(code=3).describe() == "code 3"
    assert Exited(signal=9).describe() == "signal SIGKILL"
    assert Exited(code=0).ok and not Exited(signal=15).ok


def test_events_and_actions_behave_as_frozen_dataclasses() -> None:
    import dataclasses
    import pickle

    exited = Exited(code=3)
    assert exited == Exited(3) and hash(exited) == hash(Exited(3)) and exited != Exited(signal=9)
    assert StopRequested() != DrainRequested()  # same (no) fields, different facts
    assert repr(Signal(15)) == "Signal(signum=15, group=True)"
    assert [f.name for f in dataclasses.fields(exited)] == ["code", "signal", "clean"]
    assert dataclasses.replace(exited, code=4) == Exited(4)
    assert pickle.loads(pickle.dumps(Transition(State.RUNNING, (Spawn(),)))) == Transition(State.RUNNING, (Spawn(),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        exited.code = 5  # type: ignore[misc]
    match exited:
        case Exited(code, None):
            assert code == 3
        case _:
            pytest.fail("Exited(code, signal) does not match positionally")
    for make in (lambda: Spawned(), lambda: Spawned(1, 2), lambda: Spawned(pid=1, x=2), lambda: Spawned(1, pid=2)):  # type: ignore[call-arg, misc]
        with pytest.raises(TypeError):
            make()
