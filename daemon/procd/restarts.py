"""Restart arithmetic, pure: when a worker that exited is started again (``Restart``, the policy's
words, which the pipeline file's model reads without the lifecycle), how long to wait before a
restart, and when a stage has restarted too often (restart intensity, as in Erlang/OTP
supervisors).

Time is always passed in, never read, so tests drive it with plain numbers.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable


class Restart(enum.StrEnum):
    """When a worker that exited is started again."""

    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


def backoff_delay(failures: int, minimum_s: float, maximum_s: float, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter.

    Args:
        failures: consecutive failures of this slot, 1 for the first.
        minimum_s: the delay after the first failure (before jitter).
        maximum_s: the cap.
        rand: a uniform random number in [0, 1).

    Returns:
        A delay in ``[base / 2, base]`` where ``base = min(maximum_s, minimum_s * 2 ** (failures - 1))``:
        jitter spreads restarts of many workers that failed together, and never goes below half.
    """
    exponent = max(0, failures - 1)
    base = maximum_s if exponent >= 64 else min(maximum_s, minimum_s * 2.0**exponent)
    return base / 2 + (base / 2) * rand()


class RestartHistory:
    """The restart times of one stage inside a sliding window."""

    def __init__(self, max_restarts: int, within_s: float) -> None:
        self.max_restarts = max_restarts
        self.within_s = within_s
        self._times: deque[float] = deque()

    def count(self, now: float) -> int:
        """Restarts within the window that ends at ``now``."""
        while self._times and self._times[0] <= now - self.within_s:
            self._times.popleft()
        return len(self._times)

    def exceeded(self, now: float) -> bool:
        """True when one more restart would be more than ``max_restarts`` within the window."""
        return self.count(now) >= self.max_restarts

    def record(self, now: float) -> None:
        self._times.append(now)
