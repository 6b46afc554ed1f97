"""The event loop on its own: real descriptors, an injected clock, no pipeline."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from procd.supervisor.loop import READ, WRITE, Alarm, Loop, Timers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def loop(clock: Clock) -> Iterator[Loop]:
    loop = Loop(clock)
    yield loop
    loop.close()


def test_deadlines_fire_in_time_order_once_due(loop: Loop, clock: Clock) -> None:
    fired: list[str] = []
    loop.call_later(2.0, lambda: fired.append("b"))
    loop.call_later(1.0, lambda: fired.append("a"))
    loop.call_later(2.0, lambda: fired.append("c"))  # same time as b: scheduled after it
    loop.run_once(timeout_s=0)
    assert fired == []
    clock.now += 1.0
    loop.run_once(timeout_s=0)
    assert fired == ["a"]
    clock.now += 5.0
    loop.run_once(timeout_s=0)
    assert fired == ["a", "b", "c"]
    assert loop.next_deadline() is None


def test_a_cancelled_deadline_never_fires_and_is_not_the_next(loop: Loop, clock: Clock) -> None:
    fired: list[str] = []
    early = loop.call_later(1.0, lambda: fired.append("early"))
    loop.call_later(3.0, lambda: fired.append("late"))
    early.cancel()
    assert loop.next_deadline() == clock.now + 3.0
    clock.now += 10.0
    loop.run_once(timeout_s=0)
    assert fired == ["late"]


def test_a_callback_that_reschedules_itself_now_runs_once_per_turn(loop: Loop) -> None:
    runs: list[int] = []

    def again() -> None:
        runs.append(1)
        loop.call_later(0.0, again)

    loop.call_later(0.0, again)
    loop.run_once(timeout_s=0)
    loop.run_once(timeout_s=0)
    assert len(runs) == 2


def test_a_ready_descriptor_reaches_its_handler_with_the_events(loop: Loop) -> None:
    read_fd, write_fd = os.pipe()
    try:
        seen: list[tuple[str, int]] = []
        loop.watch(read_fd, lambda events: seen.append(("r", events)))
        loop.watch(write_fd, lambda events: seen.append(("w", events)), WRITE)
        loop.run_once(timeout_s=0)
        assert seen == [("w", WRITE)]
        os.write(write_fd, b"x")
        loop.forget(write_fd)
        loop.run_once(timeout_s=0)
        assert seen == [("w", WRITE), ("r", READ)]
        assert not loop.watching(write_fd)
    finally:
        loop.forget(read_fd)
        os.close(read_fd)
        os.close(write_fd)


def test_the_wait_ends_at_the_nearest_deadline_not_before() -> None:
    """With the real clock: an idle loop sleeps until its deadline and no longer."""
    import time

    loop = Loop()
    fired: list[float] = []
    started = time.monotonic()
    loop.call_later(0.05, lambda: fired.append(time.monotonic()))
    while not fired:
        loop.run_once()
    loop.close()
    assert fired[0] - started >= 0.05


def test_a_handler_may_forget_another_source_ready_in_the_same_turn(loop: Loop) -> None:
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    try:
        calls: list[str] = []

        def first(_events: int) -> None:
            calls.append("first")
            loop.forget(second_r)
            loop.forget(first_r)

        def second(_events: int) -> None:
            calls.append("second")
            loop.forget(first_r)
            loop.forget(second_r)

        loop.watch(first_r, first)
        loop.watch(second_r, second)
        os.write(first_w, b"x")
        os.write(second_w, b"x")
        loop.run_once(timeout_s=0)
        assert len(calls) == 1
    finally:
        for fd in (first_r, first_w, second_r, second_w):
            os.close(fd)


def test_an_alarm_set_again_moves_and_set_to_its_time_schedules_nothing_new(loop: Loop, clock: Clock) -> None:
    fired: list[float] = []
    alarm = Alarm(loop, lambda: fired.append(clock.now))
    alarm.set(clock.now + 1.0)
    alarm.set(clock.now + 1.0)  # an owner that sets it every turn
    assert len(loop._deadlines) == 1
    alarm.set(clock.now + 2.0)
    clock.now += 1.0
    loop.run_once(timeout_s=0)
    assert fired == [] and alarm.when == clock.now + 1.0
    clock.now += 1.0
    loop.run_once(timeout_s=0)
    assert fired == [102.0] and alarm.when is None
    alarm.set(clock.now + 1.0)
    alarm.clear()
    clock.now += 1.0
    loop.run_once(timeout_s=0)
    assert fired == [102.0] and loop.next_deadline() is None


def test_timers_by_key_move_cancel_and_forget_a_key_before_its_callback(loop: Loop, clock: Clock) -> None:
    seen: list[tuple[str, bool]] = []
    timers: Timers[str] = Timers(loop, lambda key: seen.append((key, key in list(timers))))
    timers["kill"] = clock.now + 5.0
    timers["backoff"] = clock.now + 1.0
    timers["kill"] = clock.now + 1.0  # moved, not added
    timers["kill"] = clock.now + 1.0
    assert len([d for d in loop._deadlines if not d.cancelled]) == 2 and len(loop._deadlines) == 3  # kill moved once
    assert timers.pop("backoff") == clock.now + 1.0 and timers.pop("backoff") is None
    assert timers.get("kill") == clock.now + 1.0 and len(timers) == 1
    clock.now += 1.0
    loop.run_once(timeout_s=0)
    assert seen == [("kill", False)] and len(timers) == 0
    clock.now += 5.0
    loop.run_once(timeout_s=0)
    assert seen == [("kill", False)]  # the first "kill" was replaced, never fires
