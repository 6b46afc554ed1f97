"""How much of a worker's output becomes records: a token bucket per worker slot.

A leaf module, pure (the caller passes the time). A worker may print a burst of ``burst`` lines
at once and ``rate`` lines a second after that; what is over is counted (lines and bytes), not
logged, and the supervisor says so in a ``worker_output_suppressed`` record at most once a second
while it lasts, and when the worker ends. A stage that prints a million lines then costs the log a
few thousand records and the pipeline nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Per worker: lines logged at once, then per second.
OUTPUT_BURST = 2000
OUTPUT_RATE_PER_S = 200.0
# How long suppressed lines wait before they are reported (while the flood lasts, or after it).
REPORT_EVERY_S = 1.0


@dataclass(frozen=True)
class Suppressed:
    """Lines not logged, from ``since_s`` to ``until_s`` (the caller's clock)."""

    lines: int
    bytes: int
    since_s: float
    until_s: float


class OutputThrottle:
    """One worker slot's budget of output lines."""

    def __init__(self, now: float, rate_per_s: float = OUTPUT_RATE_PER_S, burst: int = OUTPUT_BURST) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now
        self.lines = 0
        self.bytes = 0
        self.since_s: float | None = None  # when the first line not logged came

    def admit(self, lines: Sequence[bytes], now: float) -> int:
        """How many of ``lines`` (the first ones) to log; the others are counted instead."""
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now
        logged = min(len(lines), int(self._tokens))
        self._tokens -= logged
        if logged < len(lines):
            if self.since_s is None:
                self.since_s = now
            self.lines += len(lines) - logged
            self.bytes += sum(len(line) for line in lines[logged:])
        return logged

    def report_due(self) -> float | None:
        """When the lines counted so far are to be reported, or None when there are none."""
        return None if self.since_s is None else self.since_s + REPORT_EVERY_S

    def take(self, now: float) -> Suppressed | None:
        """What was counted since the last report (and start counting afresh), or None."""
        if self.since_s is None:
            return None
        taken = Suppressed(self.lines, self.bytes, self.since_s, now)
        self.lines = self.bytes = 0
        self.since_s = None
        return taken
