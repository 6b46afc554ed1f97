"""The transition table, pair by pair, without a process."""

from __future__ import annotations

import signal

import pytest

from procd.errors import TransitionError
from procd.lifecycle import (
    AbandonBatch,
    ArmTimer,
    BackoffElapsed,
    CancelTimer,
    DrainRequested,
    ErrorReported,
    ExecFailureReported,
    Exited,
    Fail,
    GiveUp,
    InputEnd,
    KeepBatch,
    Leave,
    Life,
    Policy,
    Ready,
    Regroup,
    RegroupRequested,
    Rejoin,
    Remove,
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


def _(state: State, actions: tuple[object, ...] = ()) -> tuple[State, tuple[object, ...]]:
    """The expected state and actions."""
    return state, actions


CASES = [
    (State.STOPPED, StartRequested(), NO, _(State.STARTING, (Spawn(),))),
    (State.STOPPED, StopRequested(), NO, _(State.EXITED)),
    (State.STOPPED, DrainRequested(), NO, _(State.EXITED)),
    (State.STOPPED, RetireRequested(), NO, _(State.EXITED, (Remove(),))),
    (State.STARTING, RetireRequested(), NO, _(State.STOPPING, (TERM_ALONE, ArmTimer(Timer.KILL)))),
    (State.RUNNING, RetireRequested(), NO, _(State.STOPPING, (TERM_ALONE, ArmTimer(Timer.KILL)))),
    (State.STOPPING, RetireRequested(), NO, _(State.STOPPING)),
    (State.BACKOFF, RetireRequested(), NO, _(State.EXITED, (CancelTimer(Timer.RESTART), Remove()))),
    (State.EXITED, RetireRequested(), NO, _(State.EXITED, (Remove(),))),
    (State.FATAL, RetireRequested(), NO, _(State.FATAL, (Remove(),))),
    (State.STARTING, Spawned(42), NO, _(State.STARTING)),
    (State.STARTING, Ready(), NO, _(State.RUNNING)),
    (State.STARTING, SpawnFailed(11, "EAGAIN"), NO, _(State.EXITED, (Fail("fork failed: EAGAIN"),))),
    (State.STARTING, SpawnFailed(11), ON_FAILURE, _(State.BACKOFF, (ArmTimer(Timer.RESTART),))),
    (State.STARTING, Exited(code=127), NO, _(State.EXITED, (Fail("exited with code 127"),))),
    (State.STARTING, Exited(code=127), EXCEEDED, _(State.FATAL, (GiveUp(),))),
    (State.STARTING, StopRequested(), NO, _(State.STOPPING, (TERM, ArmTimer(Timer.KILL)))),
    (State.STARTING, DrainRequested(), NO, _(State.STOPPING, (ArmTimer(Timer.KILL),))),
    (State.STARTING, StartRequested(), NO, _(State.STARTING)),
    (State.RUNNING, Ready(), NO, _(State.RUNNING)),
    (State.RUNNING, Exited(code=0), NO, _(State.EXITED)),
    (State.RUNNING, Exited(code=0), ON_FAILURE, _(State.EXITED)),
    (State.RUNNING, Exited(code=0), ALWAYS, _(State.BACKOFF, (ArmTimer(Timer.RESTART),))),
    (State.RUNNING, Exited(code=1), NO, _(State.EXITED, (Fail("exited with code 1"),))),
    (State.RUNNING, Exited(signal=9), ON_FAILURE, _(State.BACKOFF, (ArmTimer(Timer.RESTART),))),
    (State.RUNNING, Exited(signal=9), EXCEEDED, _(State.FATAL, (GiveUp(),))),
    (State.RUNNING, StopRequested(), NO, _(State.STOPPING, (TERM, ArmTimer(Timer.KILL)))),
    (State.RUNNING, DrainRequested(), NO, _(State.STOPPING, (ArmTimer(Timer.KILL),))),
    (State.RUNNING, StartRequested(), NO, _(State.RUNNING)),
    (State.STOPPING, Ready(), NO, _(State.STOPPING)),
    (State.STOPPING, Exited(code=0), ALWAYS, _(State.EXITED, (CancelTimer(Timer.KILL),))),
    (State.STOPPING, Exited(signal=15), NO, _(State.EXITED, (CancelTimer(Timer.KILL),))),
    (State.STOPPING, StopRequested(), NO, _(State.STOPPING, (ArmTimer(Timer.KILL),))),  # the stop's deadline
    (State.STOPPING, DrainRequested(), NO, _(State.STOPPING, (ArmTimer(Timer.KILL),))),
    (State.STOPPING, StopTimedOut(), NO, _(State.STOPPING, (KILL,))),
    (State.STOPPING, StartRequested(), NO, _(State.STOPPING)),
    (State.BACKOFF, BackoffElapsed(), ON_FAILURE, _(State.STARTING, (Spawn(),))),
    (State.BACKOFF, StopRequested(), ON_FAILURE, _(State.EXITED, (CancelTimer(Timer.RESTART),))),
    (State.BACKOFF, DrainRequested(), ON_FAILURE, _(State.EXITED, (CancelTimer(Timer.RESTART),))),
    (State.BACKOFF, StartRequested(), ON_FAILURE, _(State.BACKOFF)),
    (State.EXITED, StartRequested(), NO, _(State.STARTING, (Spawn(),))),
    (State.EXITED, StopRequested(), NO, _(State.EXITED)),
    (State.EXITED, DrainRequested(), NO, _(State.EXITED)),
    (State.FATAL, StopRequested(), NO, _(State.FATAL)),
    (State.FATAL, DrainRequested(), NO, _(State.FATAL)),
    (State.FATAL, StartRequested(), NO, _(State.FATAL)),
    # new inputs: what a process reports, and a rest_for_one regroup
    (State.STARTING, ErrorReported("KeyError: 'id'"), NO, _(State.STARTING)),
    (State.RUNNING, ErrorReported("KeyError: 'id'"), NO, _(State.RUNNING)),
    (State.STOPPING, ErrorReported("KeyError: 'id'"), NO, _(State.STOPPING)),
    (State.STARTING, ExecFailureReported("cannot execute x"), NO, _(State.STARTING)),
    (State.RUNNING, ExecFailureReported("cannot execute x"), NO, _(State.RUNNING)),
    (State.STOPPING, ExecFailureReported("cannot execute x"), NO, _(State.STOPPING)),
    (State.STOPPED, RegroupRequested(), NO, _(State.STOPPED)),
    (State.STARTING, RegroupRequested(), NO, _(State.STOPPING, (TERM_ALONE, ArmTimer(Timer.KILL)))),
    (State.RUNNING, RegroupRequested(Leave.AT_ONCE), NO, _(State.STOPPING, (TERM, ArmTimer(Timer.KILL)))),
    (State.STOPPING, RegroupRequested(), NO, _(State.STOPPING)),
    (State.BACKOFF, RegroupRequested(), NO, _(State.BACKOFF)),
    (State.EXITED, RegroupRequested(), NO, _(State.EXITED)),
    (State.FATAL, RegroupRequested(), NO, _(State.FATAL)),
]


@pytest.mark.parametrize(("state", "event", "policy", "expected"), CASES, ids=lambda v: str(v)[:40])
def test_every_pair(state: State, event: object, policy: Policy, expected: tuple[State, tuple[object, ...]]) -> None:
    transition = step(Life(state), event, policy)  # type: ignore[arg-type]
    assert (transition.state, transition.actions) == expected


def test_cases_cover_the_whole_table() -> None:
    covered = {(state, type(event)) for state, event, _policy, _expected in CASES}
    table = {(state, event) for state in State for event in accepted(state)}
    assert covered == table


def test_a_missing_pair_names_state_event_and_what_is_allowed() -> None:
    with pytest.raises(TransitionError) as info:
        step(Life(State.EXITED), Exited(code=0))
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
    assert [f.name for f in dataclasses.fields(exited)] == [
        "code",
        "signal",
        "runtime_s",
        "input",
        "held_batch",
        "untracked_batch",
    ]
    assert dataclasses.replace(exited, code=4) == Exited(4)
    running = Transition(Life(State.RUNNING), (Spawn(),))
    assert pickle.loads(pickle.dumps(running)) == running
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


# -- the decisions and the flags the table keeps (issue 9: no flag is set outside ``step``) ------


def _run(life: Life, *events: object, policy: Policy = NO) -> list[Transition]:
    """Feed ``events`` one after the other; return every transition."""
    seen = []
    for event in events:
        transition = step(life, event, policy)  # type: ignore[arg-type]
        seen.append(transition)
        life = transition.life
    return seen


RUNNING = Life(State.RUNNING)


def test_a_forced_stop_is_the_cause_of_the_exit_and_fails_the_pipeline() -> None:
    killed = Policy(kill_cause="the stop timeout (10s)")
    *_, timed_out, exited = _run(RUNNING, DrainRequested(), StopTimedOut(), Exited(signal=9), policy=killed)
    assert timed_out.life.forced and timed_out.actions == (KILL,)
    cause = "killed by SIGKILL after the stop timeout (10s)"
    assert (exited.state, exited.cause, exited.actions) == (State.EXITED, cause, (CancelTimer(Timer.KILL), Fail(cause)))
    # a new process starts with a record of its own
    assert step(exited.life, StartRequested()).life == Life(State.STARTING)


def test_a_retiring_slot_leaves_once_ended_is_never_restarted_and_fails_nothing() -> None:
    retire, stop_again, exited, start = _run(
        RUNNING, RetireRequested(), RetireRequested(), Exited(code=1), StartRequested(), policy=Policy(Restart.ALWAYS)
    )
    assert retire.life.retiring and stop_again.life.retiring
    assert (exited.state, exited.actions) == (State.EXITED, (CancelTimer(Timer.KILL), Remove()))
    assert (start.state, start.actions) == (State.EXITED, ())  # a retired slot never starts again
    # one that reads a retired queue to its end has no deadline until a stop gives it the stop's
    drained = step(RUNNING, RetireRequested(Leave.AT_END))
    assert (drained.state, drained.actions) == (State.STOPPING, ())
    assert step(drained.life, DrainRequested()).actions == (ArmTimer(Timer.KILL),)
    # a retiring process that was already stopping becomes retiring all the same
    stopping = step(Life(State.STOPPING), RetireRequested())
    assert stopping.life == Life(State.STOPPING, retiring=True) and stopping.actions == ()


def test_rest_for_one_regroups_on_a_restart_and_the_members_rejoin_once_ended() -> None:
    rest_for_one = Policy(Restart.ON_FAILURE, rest_for_one=True)
    failed = step(RUNNING, Exited(code=3, held_batch=True), rest_for_one)
    assert failed.state is State.BACKOFF and failed.actions == (ArmTimer(Timer.RESTART), KeepBatch(), Regroup())
    assert step(Life(State.STARTING), SpawnFailed(24, "EMFILE"), rest_for_one).actions == (ArmTimer(Timer.RESTART),)
    regroup, exited, start = _run(RUNNING, RegroupRequested(), Exited(code=0, held_batch=True), StartRequested())
    assert regroup.life.regrouping
    # its batch is kept for its next process; no failure of the pipeline
    assert exited.actions == (CancelTimer(Timer.KILL), KeepBatch(), Rejoin())
    assert (start.life, start.actions) == (Life(State.STARTING), (Spawn(),))


def test_a_member_retired_during_a_regroup_leaves_with_its_batch_and_still_rejoins() -> None:
    # a reload retires a member that is stopping for its group's restart: no later process of
    # its slot delivers its batch, and the rest of its group must not wait for it for ever
    _regroup, retire, exited = _run(RUNNING, RegroupRequested(), RetireRequested(), Exited(code=0, held_batch=True))
    assert retire.life.regrouping and retire.life.retiring
    assert exited.actions == (CancelTimer(Timer.KILL), AbandonBatch(), Remove(), Rejoin())


def test_a_stop_during_a_regroup_ends_the_group_for_good() -> None:
    for state in (State.STOPPING, State.EXITED):
        for stop in (StopRequested(), DrainRequested()):
            life = step(Life(state, regrouping=True), stop).life
            assert (life.state, life.regrouping) == (state, False)
    exited = step(Life(State.STOPPING, regrouping=True), StopRequested()).life
    assert step(exited, Exited(signal=15)).actions == (CancelTimer(Timer.KILL),)


def test_a_program_that_cannot_be_executed_is_not_started_again() -> None:
    reported, exited = _run(
        Life(State.STARTING),
        ExecFailureReported("cannot execute nosuch: No such file"),
        Exited(code=127),
        policy=ON_FAILURE,
    )
    assert reported.life.exec_failed and reported.life.failure == "cannot execute nosuch: No such file"
    assert (exited.state, exited.cause) == (State.EXITED, "cannot execute nosuch: No such file")
    assert exited.actions == (Fail("cannot execute nosuch: No such file"),)


def test_a_reported_error_is_the_cause_of_the_exit_that_follows() -> None:
    _reported, exited = _run(RUNNING, ErrorReported("KeyError: 'id'"), Exited(code=1), policy=ON_FAILURE)
    assert (exited.state, exited.cause) == (State.BACKOFF, "KeyError: 'id'")


@pytest.mark.parametrize(
    ("exited", "policy", "state", "cause", "actions"),
    [
        # a clean end after the input ended: a new process would only see the end again
        (Exited(0, input=InputEnd.SEEN), ALWAYS, State.EXITED, None, ()),
        (Exited(0, input=InputEnd.SEEN), ON_FAILURE, State.EXITED, None, ()),
        # a producer ends cleanly and is restarted only by "always"
        (Exited(0), ALWAYS, State.BACKOFF, None, (ArmTimer(Timer.RESTART),)),
        # exit 0 while its input was open, or before it received the end: a failure
        (Exited(0, input=InputEnd.OPEN), ON_FAILURE, State.BACKOFF, "exited before the end of its input", None),
        (Exited(0, input=InputEnd.ENDED), NO, State.EXITED, "exited before the end of its input", None),
        # exit 0 holding a batch: a failure, its batch delivered by the next process ...
        (
            Exited(0, input=InputEnd.SEEN, held_batch=True),
            ON_FAILURE,
            State.BACKOFF,
            "exited holding a batch it had not handed on",
            (ArmTimer(Timer.RESTART), KeepBatch()),
        ),
        # ... or by none
        (
            Exited(0, input=InputEnd.SEEN, held_batch=True),
            NO,
            State.EXITED,
            "exited holding a batch it had not handed on",
            (AbandonBatch(), Fail("exited holding a batch it had not handed on")),
        ),
        # a failure after the end of its input is restarted: its queue may still hold items
        (Exited(1, input=InputEnd.SEEN), ON_FAILURE, State.BACKOFF, "exited with code 1", None),
        # nothing restarts while the pipeline stops
        (Exited(1), Policy(Restart.ALWAYS, stopping=True), State.EXITED, "exited with code 1", None),
    ],
)
def test_an_exit_is_classified_and_decided_by_the_table(
    exited: Exited, policy: Policy, state: State, cause: str | None, actions: tuple[object, ...] | None
) -> None:
    transition = step(RUNNING, exited, policy)
    assert (transition.state, transition.cause) == (state, cause)
    if actions is not None:
        assert transition.actions == actions


def test_a_process_asked_to_stop_ended_as_expected_unless_it_failed_otherwise() -> None:
    stopping = Life(State.STOPPING)
    assert step(stopping, Exited(0, input=InputEnd.OPEN)).cause is None
    assert step(stopping, Exited(signal=15)).cause is None
    crashed = step(stopping, Exited(code=2))
    assert crashed.actions == (CancelTimer(Timer.KILL), Fail("exited with code 2"))
    held = step(stopping, Exited(0, held_batch=True))
    assert held.actions == (CancelTimer(Timer.KILL), AbandonBatch())


def test_the_backoff_counts_consecutive_failures_and_a_long_run_starts_it_afresh() -> None:
    policy = Policy(Restart.ON_FAILURE, within_s=60.0)
    life = RUNNING
    for expected in (1, 2, 3):
        life = step(life, Exited(code=1, runtime_s=1.0), policy).life
        assert (life.state, life.failures) == (State.BACKOFF, expected)
        life = step(step(life, BackoffElapsed()).life, Ready()).life
        assert life.failures == expected
    assert step(life, Exited(code=1, runtime_s=61.0), policy).life.failures == 1


def test_a_failure_with_a_batch_redeliver_false_does_not_track_abandons_it_and_a_clean_end_does_not() -> None:
    on_failure = Policy(Restart.ON_FAILURE)
    killed = step(RUNNING, Exited(signal=9, untracked_batch=True), on_failure)
    assert (killed.state, killed.actions) == (State.BACKOFF, (AbandonBatch(), ArmTimer(Timer.RESTART)))
    retired = step(Life(State.STOPPING, retiring=True), Exited(signal=9, untracked_batch=True), on_failure)
    assert retired.actions == (AbandonBatch(), CancelTimer(Timer.KILL), Remove())
    # a retired reader asked to finish its batch that ends cleanly has handed it on
    clean = step(Life(State.STOPPING, retiring=True), Exited(code=0, untracked_batch=True), on_failure)
    assert clean.actions == (CancelTimer(Timer.KILL), Remove())
