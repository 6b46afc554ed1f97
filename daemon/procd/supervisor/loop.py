"""The event loop: one ``selectors`` selector, one heap of deadlines, one callback per source.

It knows nothing of pipelines, workers or signals: a source is a file descriptor and the callback
that handles it, a deadline is a time and the callback due then. The supervisor's parts register
what they own (the signal wake-up pipe, each worker's pipes, the control and metrics sockets, the
restart and stop timers) and the loop only dispatches.

Discussion. The loop sleeps in one ``select`` whose timeout is the nearest deadline, so an idle
pipeline costs no wake-ups; there is no poll interval. Deadlines live in a heap with lazy
cancellation (a cancelled entry stays in the heap, marked, until it reaches the top): cancelling
is O(1), and the heap never holds more entries than were scheduled since the last time they were
popped. Time comes from an injected clock, so tests can move time by hand and drive the loop one
turn at a time with ``run_once(timeout_s=0)``, or hand the loop an ``AutojumpClock``: it stands
still while anything happens and jumps to the next deadline once the loop has been idle for a few
real milliseconds (trio's ``MockClock(autojump_threshold=...)``), so a backoff of minutes passes
in milliseconds with real processes. A loop that waits (this one, and the supervisor's) asks a
``JumpingClock`` how long to really wait, and tells it when that wait passed with nothing to do.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, overload, runtime_checkable

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

# A source's callback receives the events that are ready (READ, WRITE or both).
Handler = Callable[[int], None]
K = TypeVar("K")


@runtime_checkable
class JumpingClock(Protocol):
    """A clock that a waiting loop moves: how long to really wait for a deadline ``timeout_s``
    away on this clock, and what to do when that wait passed with nothing ready."""

    def __call__(self) -> float: ...

    def wait_s(self, timeout_s: float | None) -> float | None:
        """The real seconds to wait (None: until a source is ready)."""
        ...

    def idle(self, timeout_s: float) -> None:
        """The loop waited ``wait_s(timeout_s)`` and nothing happened."""
        ...


class AutojumpClock:
    """A fake clock for tests: it stands still, and once a loop has been idle for ``threshold_s``
    real seconds it jumps to the loop's next deadline."""

    def __init__(self, start: float = 1000.0, threshold_s: float = 0.02) -> None:
        self.now = start
        self.threshold_s = threshold_s
        self.jumps = 0

    def __call__(self) -> float:
        return self.now

    def wait_s(self, timeout_s: float | None) -> float | None:
        return None if timeout_s is None else min(timeout_s, self.threshold_s)

    def idle(self, timeout_s: float) -> None:
        self.now += timeout_s
        self.jumps += 1

    def __repr__(self) -> str:
        return f"<AutojumpClock at {self.now:.3f} after {self.jumps} jumps>"


def wait_s(clock: Callable[[], float], timeout_s: float | None) -> float | None:
    """How long a loop whose next deadline is ``timeout_s`` away on ``clock`` really waits."""
    return clock.wait_s(timeout_s) if isinstance(clock, JumpingClock) else timeout_s


def waited(clock: Callable[[], float], timeout_s: float | None, ready: bool) -> None:
    """After a wait: nothing was ready, so a jumping clock moves to the deadline."""
    if not ready and timeout_s is not None and isinstance(clock, JumpingClock):
        clock.idle(timeout_s)


@dataclass(order=True)
class Deadline:
    """A callback due at ``when`` (on the loop's clock); ``cancel`` forgets it."""

    when: float
    sequence: int  # keeps equal times in the order they were scheduled
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "pending"
        return f"<Deadline {state} at {self.when:.3f} {getattr(self.callback, '__qualname__', self.callback)}>"


class Loop:
    """Dispatches ready descriptors and due deadlines to their callbacks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._handlers: dict[int, Handler] = {}
        self._deadlines: list[Deadline] = []
        self._sequence = itertools.count()

    # -- sources ---------------------------------------------------------------------------------

    def watch(self, fd: int, handler: Handler, events: int = READ) -> None:
        """Call ``handler(ready_events)`` whenever ``fd`` is ready for ``events``.

        Raises:
            KeyError: ``fd`` is already watched (``modify`` changes what is watched).
        """
        self._selector.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        """Watch ``fd`` for other ``events`` (READ, WRITE or both), same handler."""
        self._selector.modify(fd, events)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed); a descriptor not watched is ignored."""
        if self._handlers.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._handlers

    # -- deadlines -------------------------------------------------------------------------------

    def call_at(self, when: float, callback: Callable[[], None]) -> Deadline:
        """Call ``callback()`` once the clock reaches ``when``; return a handle that cancels it."""
        deadline = Deadline(when, next(self._sequence), callback)
        heapq.heappush(self._deadlines, deadline)
        return deadline

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Deadline:
        return self.call_at(self.clock() + delay_s, callback)

    def next_deadline(self) -> float | None:
        """The time of the nearest pending deadline, or None when nothing is scheduled."""
        while self._deadlines and self._deadlines[0].cancelled:
            heapq.heappop(self._deadlines)
        return self._deadlines[0].when if self._deadlines else None

    # -- turning -----------------------------------------------------------------------------------

    def run_once(self, timeout_s: float | None = None) -> int:
        """Wait for the first ready source or the nearest deadline, then dispatch what is due.

        Args:
            timeout_s: wait at most this long (0: do not wait); by default until the nearest
                deadline, or for ever when nothing is scheduled.

        Returns:
            How many sources were ready.
        """
        nearest = self.next_deadline()
        wait = None if nearest is None else max(0.0, nearest - self.clock())
        if timeout_s is not None:
            wait = timeout_s if wait is None else min(wait, timeout_s)
        ready = self._selector.select(wait_s(self.clock, wait))
        waited(self.clock, wait, bool(ready))
        for key, events in ready:
            handler = self._handlers.get(key.fd)
            if handler is not None:  # an earlier callback of this turn may have forgotten it
                handler(events)
        self._fire_due()
        return len(ready)

    def _fire_due(self) -> None:
        now = self.clock()
        # Only what was scheduled before this turn: a callback that schedules itself again for
        # "now" runs on the next turn, after the selector has had its say, not in an endless loop.
        horizon = next(self._sequence)
        while self._deadlines and self._deadlines[0].when <= now and self._deadlines[0].sequence < horizon:
            deadline = heapq.heappop(self._deadlines)
            if not deadline.cancelled:
                deadline.cancelled = True  # fired: a later cancel() is harmless
                deadline.callback()

    def close(self) -> None:
        """Forget every source and deadline (the descriptors are their owners' to close)."""
        self._selector.close()
        self._handlers.clear()
        self._deadlines.clear()

    def __repr__(self) -> str:
        pending = sum(1 for d in self._deadlines if not d.cancelled)
        return f"<Loop watching {len(self._handlers)} descriptors, {pending} deadlines pending>"


class Alarm:
    """One callback's one pending deadline: ``set`` moves it, ``clear`` drops it.

    Setting the time it already has schedules nothing new, so an owner may set it on every turn
    of the loop without filling the heap with cancelled entries.
    """

    def __init__(self, loop: Loop, callback: Callable[[], object]) -> None:
        self._loop = loop
        self._callback = callback
        self._deadline: Deadline | None = None

    @property
    def when(self) -> float | None:
        """When it fires, or None when it is not set (or has fired)."""
        pending = self._deadline is not None and not self._deadline.cancelled
        return self._deadline.when if pending and self._deadline is not None else None

    def set(self, when: float) -> None:
        if self.when == when:
            return
        self.clear()
        self._deadline = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._callback()

    def clear(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def __repr__(self) -> str:
        return f"<Alarm {getattr(self._callback, '__qualname__', self._callback)} at {self.when}>"


class Timers(Generic[K]):
    """Deadlines by key: ``timers[key] = when`` calls ``on_due(key)`` once at ``when`` (setting a
    key again moves its deadline), ``pop`` cancels one. A fired key is gone before ``on_due`` runs."""

    def __init__(self, loop: Loop, on_due: Callable[[K], None]) -> None:
        self._loop = loop
        self._on_due = on_due
        self._pending: dict[K, Deadline] = {}

    def __setitem__(self, key: K, when: float) -> None:
        if self.get(key) == when:
            return  # already so: nothing new in the heap (an owner may set it on every turn)
        self.pop(key)
        self._pending[key] = self._loop.call_at(when, lambda: self._fire(key))

    def _fire(self, key: K) -> None:
        del self._pending[key]
        self._on_due(key)

    @overload
    def get(self, key: K) -> float | None: ...
    @overload
    def get(self, key: K, default: float) -> float: ...
    def get(self, key: K, default: float | None = None) -> float | None:
        """When ``key`` is due, else ``default``."""
        deadline = self._pending.get(key)
        return default if deadline is None else deadline.when

    def pop(self, key: K, default: float | None = None) -> float | None:
        """Cancel ``key``'s deadline; return when it was due, else ``default``."""
        deadline = self._pending.pop(key, None)
        if deadline is None:
            return default
        deadline.cancel()
        return deadline.when

    def __iter__(self) -> Iterator[K]:
        """The keys pending now (a copy: a key may be set or popped while iterating)."""
        return iter(list(self._pending))

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"<Timers {len(self._pending)} pending>"
