"""A worker's side of its report pipe: the reports it sends its supervisor (``procd.reports``
declares them), and the exit codes that say what the reports cannot.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from procd import reports

# A worker whose counts changed tells the supervisor at least this often (for ``procd status``,
# ``top``, metrics), however it batches; an idle one says nothing, so an idle pipeline never
# wakes the supervisor.
COUNTS_INTERVAL_S = 1.0
EXEC_FAILED = 127
DEAD_LETTER_FAILED = 74  # EX_IOERR: a dead letter could not be written


class Reporter:
    """Writes reports to the supervisor; each is one line, short enough to be atomic."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, report: reports.Report) -> None:
        try:
            os.write(self._fd, reports.encode(report))
        except BrokenPipeError:  # the supervisor is gone; PDEATHSIG will end us too
            pass


def report_error(reporter: Reporter, exc: BaseException, item: Any = None) -> None:
    lines = traceback.format_exception(exc)
    reporter.send(
        reports.Error(
            error_type=type(exc).__name__,
            error=str(exc),
            item=repr(item)[:1000] if item is not None else None,
            traceback="".join(lines[-6:])[-4000:],
        )
    )
