"""A worker's pipes, on the supervisor's side: its report lines and its output lines.

Owns: watching each worker's report and output pipes in the loop (and its own deadline for
the suppressed-output reports), reading what is
there without blocking and cutting it into lines (a line without an end is cut at
``LINE_LIMIT``), decoding each report line (``reports.decode``) and handing the report on to the
callback it was given, logging each output line as a ``worker_output`` record as far as the
slot's output budget goes (``throttle``) and reporting the rest once a second
(``worker_output_suppressed``), and closing both pipes once the worker has been reaped.

Never touches: a slot's state or flags (a report is handed on; the slot driver feeds what
matters to the transition table), the processes, the queues. A line that does not decode is a
``worker_report_invalid`` record naming the worker, never an exception in the supervisor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from procd import reports
from procd.supervisor import loop
from procd.supervisor.slots import WorkerSlot
from procd.throttle import OutputThrottle

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

LINE_LIMIT = 4096

OnReport = Callable[[WorkerSlot, reports.Report], None]


class WorkerPipes:
    """Every worker's report and output pipes, read in the supervisor's loop."""

    def __init__(
        self,
        on: loop.Loop,
        clock: Callable[[], float],
        log: FilteringBoundLogger,
        on_report: OnReport,
    ) -> None:
        self.loop = on
        self.clock = clock
        self.log = log
        self.output_due = loop.Alarm(on, self.report_suppressed_due)  # the next suppressed-output report
        self.on_report = on_report
        self.throttles: dict[WorkerSlot, OutputThrottle] = {}  # each worker slot's output budget

    def watch(self, slot: WorkerSlot) -> None:
        """Read the pipes of the slot's new process as they become readable."""
        assert slot.report_fd is not None and slot.output_fd is not None
        self.loop.watch(slot.report_fd, lambda _events: self.read_reports(slot))
        self.loop.watch(slot.output_fd, lambda _events: self.read_output(slot))

    def read_reports(self, slot: WorkerSlot) -> None:
        """Decode each complete report line and hand it on."""
        for raw in self._read_lines(slot, report=True):
            line = raw.decode("utf-8", errors="replace")
            try:
                report = reports.decode(line)
            except ValueError as exc:  # a worker's fault, never the supervisor's end
                slot.bind(self.log).warning("worker_report_invalid", line=line[:LINE_LIMIT], error=str(exc))
                continue
            self.on_report(slot, report)

    def read_output(self, slot: WorkerSlot) -> None:
        """Each line the worker printed is a ``worker_output`` record, as far as its budget goes
        (``throttle``); the rest is counted and reported once a second, and when it ends."""
        now = self.clock()
        throttle = self.throttles.get(slot)
        if throttle is None:
            throttle = self.throttles[slot] = OutputThrottle(now)
        lines = self._read_lines(slot, report=False)  # undecoded: a flood of output is counted, not decoded
        logged = throttle.admit(lines, now)
        if logged:
            bound = slot.bind(self.log)
            for raw in lines[:logged]:
                bound.info("worker_output", line=raw.decode("utf-8", errors="replace"))
        due = throttle.report_due()
        if due is not None and (due <= now or slot.output_fd is None):
            self._report_suppressed(slot, throttle, now)
        elif due is not None:
            pending = self.output_due.when
            self.output_due.set(due if pending is None else min(pending, due))

    def report_suppressed_due(self) -> None:
        """The ``output`` deadline: report what each quiet or flooding worker had suppressed."""
        now = self.clock()
        for slot, throttle in list(self.throttles.items()):
            due = throttle.report_due()
            if due is not None and due <= now:
                self._report_suppressed(slot, throttle, now)
        pending = [d for t in self.throttles.values() if (d := t.report_due()) is not None]
        if pending:
            self.output_due.set(min(pending))

    def close(self, slot: WorkerSlot) -> None:
        """A reaped worker has written all it will: read the rest, then close (a grandchild that
        still holds a pipe must not keep it open)."""
        self.read_reports(slot)
        self.read_output(slot)
        for fd in (slot.report_fd, slot.output_fd):
            if fd is not None:
                self.loop.forget(fd)
                os.close(fd)
        slot.report_fd = slot.output_fd = None

    def forget(self, slot: WorkerSlot) -> None:
        """The slot has left the pipeline."""
        self.throttles.pop(slot, None)

    def _report_suppressed(self, slot: WorkerSlot, throttle: OutputThrottle, now: float) -> None:
        taken = throttle.take(now)
        if taken is None:
            return
        slot.bind(self.log).warning(
            "worker_output_suppressed",
            lines=taken.lines,
            bytes=taken.bytes,
            over_s=round(taken.until_s - taken.since_s, 3),
            message=(
                f"{taken.lines} lines of output not logged: a worker's output is logged up to "
                f"{throttle.burst} lines at once, then {throttle.rate_per_s:g} a second"
            ),
        )

    def _read_lines(self, slot: WorkerSlot, *, report: bool) -> list[bytes]:
        """Read what is there without blocking; return complete lines (all of them at EOF)."""
        fd = slot.report_fd if report else slot.output_fd
        if fd is None:
            return []
        buffer = slot.report_buffer if report else slot.output_buffer
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
        while len(rest) > LINE_LIMIT:  # a line without an end must not grow for ever: cut it
            lines.append(rest[:LINE_LIMIT])
            rest = rest[LINE_LIMIT:]
        if not report and any(len(line) > LINE_LIMIT for line in lines):
            # cut a whole long line too, so that how it was read never changes the records
            lines = [line[at : at + LINE_LIMIT] for line in lines for at in range(0, len(line) or 1, LINE_LIMIT)]
        if eof and rest:
            lines.append(rest)
            rest = b""
        if report:
            slot.report_buffer = rest
        else:
            slot.output_buffer = rest
        if eof:
            self.loop.forget(fd)
            os.close(fd)
            if report:
                slot.report_fd = None
            else:
                slot.output_fd = None
        return lines
