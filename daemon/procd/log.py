"""structlog set-up: every lifecycle record as one JSON object per line.

Records go to stderr (JSON, or structlog's readable console format when stderr is a terminal)
and, with ``--log-file``, are appended to a file. Each record is written with a single
``write(2)`` on a descriptor opened with ``O_APPEND``, so a crash never leaves half a record and
several writers never interleave within one. The logger is built with ``structlog.wrap_logger``,
not the global ``structlog.configure``, so nothing here is process-wide state.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

LEVELS = ("debug", "info", "warning", "error", "critical")


def _write_all(fd: int, data: bytes) -> None:
    """``write(2)`` until every byte is out. A write to a pipe that a signal interrupts can return
    early; Python's buffered stderr was seen to drop the rest of such a record (a SIGCHLD arriving
    while a 4 KiB record went to a full pipe), so records bypass it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _to_json(record: EventDict) -> str:
    return json.dumps(record, default=repr, separators=(",", ":"), ensure_ascii=False)


class RecordWriter:
    """The logger structlog wraps: renders a finished record to stderr and the log file."""

    def __init__(self, stream: TextIO, log_file: str | None, console: bool) -> None:
        self._stream = stream
        self._log_file = log_file
        self._fd = self._open(log_file) if log_file else None
        self._console = structlog.dev.ConsoleRenderer(colors=True) if console else None
        self._footer = ""  # a progress line kept under the records, on a terminal only

    @property
    def on_terminal(self) -> bool:
        return self._console is not None

    def progress(self, line: str) -> None:
        """Show ``line`` under the records, redrawn in place (a terminal only; never logged)."""
        if self._console is None or line == self._footer:
            return
        self._footer = line
        self._show(f"\r\033[K{line}")

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """Open the log file again (after logrotate moved it away)."""
        if self._log_file is None:
            return
        fd = self._open(self._log_file)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd

    def write(self, record: EventDict) -> None:
        line = _to_json(record) + "\n"
        if self._fd is not None:
            _write_all(self._fd, line.encode())
        if self._console is not None:
            text = self._console(None, "", dict(record))
            self._show(f"\r\033[K{text}\n{self._footer}")
        else:
            self._show(line)

    def _show(self, text: str) -> None:
        """To the stream: its own descriptor when it has one (see ``_write_all``)."""
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream with no descriptor (tests)
            self._stream.write(text)
            self._stream.flush()
            return
        self._stream.flush()
        _write_all(fd, text.encode(errors="backslashreplace"))

    def close(self) -> None:
        if self._footer:
            self._show("\n")  # the last progress line stays, with the totals
            self._footer = ""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # structlog calls the method named after the level; every level is written the same way.
    def msg(self, record: EventDict) -> None:
        self.write(record)

    debug = info = warning = warn = error = critical = exception = msg


def _hand_over(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> dict[str, Any]:
    """The last processor: pass the finished dict to ``RecordWriter`` as one keyword."""
    return {"record": event_dict}


def open_logger(
    pipeline: str,
    *,
    log_file: str | None = None,
    stream: TextIO | None = None,
) -> tuple[Any, RecordWriter]:
    """Build the logger for one pipeline.

    Args:
        pipeline: bound to every record as ``pipeline``.
        log_file: also append each record to this file.
        stream: where records are shown (stderr by default); a terminal gets the console format.

    Returns:
        The bound logger and its writer (to ``reopen`` or ``close``).

    Raises:
        OSError: the log file cannot be opened.
    """
    out = stream if stream is not None else sys.stderr
    writer = RecordWriter(out, log_file, console=out.isatty())
    logger = structlog.wrap_logger(
        writer,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _hand_over,
        ],
    )
    return logger.bind(pipeline=pipeline), writer
