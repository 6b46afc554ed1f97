"""structlog set-up: every lifecycle record as one JSON object per line, and its readable form.

Records go to stderr (JSON, or the compact readable form of ``render`` when stderr is a terminal)
and, with ``--log-file``, are appended to a file. Each record is written with a single
``write(2)`` on a descriptor opened with ``O_APPEND``, so a crash never leaves half a record and
several writers never interleave within one. Writing a record never stops the pipeline: a console
that went away is dropped, a full disk costs records that are counted (``RecordWriter``). The
logger is built with ``structlog.wrap_logger``, not the global ``structlog.configure``, so nothing
here is process-wide state.

structlog itself is imported by ``open_logger`` alone: of procd's commands only those that run a
pipeline log through it; ``procd logs`` and ``procd dlq`` use ``render`` and the writers here
without it.

Discussion: ``import structlog`` (26.x) imports every part of the package, and two of them
(``structlog.stdlib`` and ``structlog._native``, for their ``async`` methods) import asyncio at
module level, which brings ssl and libcrypto with it. On the 2-core machines procd is measured on
asyncio is about 70 ms of a ~110 ms ``import structlog`` and several MiB of every worker forked
from the supervisor (bench/README.md, "Start-up"), for methods procd never calls. There is no way
to import a part of structlog without its ``__init__``, and ``importlib.util.LazyLoader`` does not
help on 3.11 (the import system reads ``__spec__`` of a module found in ``sys.modules``, which
makes a lazy module load at once). So ``open_logger`` defers asyncio (and uuid, which
``structlog.threadlocal`` imports and which brings platform) with ``procd.deferred.defer``: a
module object in ``sys.modules`` that has its spec but has not run yet, whose own code runs on
the first attribute anyone reads from it. A stage that uses asyncio in a worker (a fork of the
supervisor) gets it the same way."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from procd.deferred import defer

TYPE_CHECKING = False  # mypy reads the name; at run time structlog waits for ``open_logger``
if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

LEVELS = ("debug", "info", "warning", "error", "critical")


def write_all(fd: int, data: bytes) -> None:
    """``write(2)`` until every byte is out. A write to a pipe that a signal interrupts can return
    early; Python's buffered stderr was seen to drop the rest of such a record (a SIGCHLD arriving
    while a 4 KiB record went to a full pipe), so records bypass it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` to a regular file opened with ``O_APPEND``, all of it or none of it.

    A full disk takes the part of a record that fits and then refuses the rest (ENOSPC): the part
    written is cut off again, so a reader never meets a torn record. Concurrent appenders must
    hold a lock around this (``deadletters``); procd's log file has one writer.

    Raises:
        OSError: the record could not be written (nothing of it is left in the file).
    """
    written = 0
    view = memoryview(data)
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
    except OSError:
        if written:
            try:
                os.ftruncate(fd, os.fstat(fd).st_size - written)
            except OSError:
                pass  # nothing better to do: the reader skips a line that is not a record
        raise


def open_append(path: str, mode: int = 0o644) -> int:
    """Open ``path`` to append records to it: created if missing, close-on-exec, and never on
    descriptor 0, 1 or 2. A stage that closed its stdout would otherwise get its dead-letter file
    there, and every line it printed after that would land inside the file.

    Raises:
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _to_json(record: EventDict) -> str:
    return json.dumps(record, default=repr, separators=(",", ":"), ensure_ascii=False)


def now_iso() -> str:
    """The current UTC time as the records write it."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_COLORS = {"debug": "\033[2m", "info": "\033[32m", "warning": "\033[33m", "error": "\033[31m", "critical": "\033[41m"}
_RESET = "\033[0m"
_IN_HEAD = ("ts", "level", "pipeline", "stage", "worker", "generation", "event")
_WHERE_WIDTH = 12


def render(record: Mapping[str, Any], *, color: bool, console: bool = False) -> str:
    """One readable line: time, level, where (``stage[worker]``, a column), event, then the other
    keys in the order the record has them. ``procd logs`` shows the whole UTC time and the
    pipeline; the console of ``procd run`` (one pipeline, now) the local time of day only, and
    leaves out keys whose value is empty."""
    level = str(record.get("level", "info"))
    where = str(record.get("stage") or "")
    if where and record.get("worker") is not None:
        where = f"{where}[{record['worker']}]"
    head = [_time_of_day(record) if console else str(record.get("ts", "?")), f"{level:<7}"]
    if not console:
        head.append(str(record.get("pipeline", "?")))
    head.append(f"{where:<{_WHERE_WIDTH}}")
    event = str(record.get("event", "?"))
    shown = {k: v for k, v in record.items() if k not in _IN_HEAD}
    if console:  # a terminal line stays short: no keys that say nothing (null, [], {})
        shown = {k: v for k, v in shown.items() if v is not None and v != [] and v != {}}
    rest = " ".join(f"{k}={_short(v)}" for k, v in shown.items())
    if color:
        head[1] = f"{_COLORS.get(level, '')}{head[1]}{_RESET}"
        event = f"\033[1m{event}{_RESET}"
    return " ".join([*head, event, rest]).rstrip()


def _time_of_day(record: Mapping[str, Any]) -> str:
    try:
        moment = datetime.datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return str(record.get("ts", "?"))
    return moment.astimezone().strftime("%H:%M:%S.%f")[:-3]


def _short(value: Any) -> str:
    text = (
        value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    )
    return json.dumps(text, ensure_ascii=False) if " " in text or not text else text


# The console loses its reader for good on these: a closed pipe (`| head`), a closed descriptor,
# a terminal that hung up. Any other error (a full disk under `2>file`) loses one record only.
_CONSOLE_GONE = (errno.EPIPE, errno.EBADF, errno.EIO)


class RecordWriter:
    """The logger structlog wraps: renders a finished record to stderr and the log file.

    Neither can stop the pipeline. A console that goes away (``procd run ... | head``, a closed
    terminal) is left alone from then on, with a ``console_lost`` record in the log file. A log
    file that cannot take a record (a full disk) loses it, counted; the first record that fits
    again is preceded by ``log_records_dropped`` with the count.
    """

    def __init__(self, stream: TextIO, log_file: str | None, console: bool, pipeline: str = "") -> None:
        self._stream: TextIO | None = stream
        self._log_file = log_file
        self._pipeline = pipeline
        self._fd = open_append(log_file) if log_file else None
        self._console = console
        self._footer = ""  # a progress line kept under the records, on a terminal only
        self._dropped = 0  # records the log file could not take since the last that it could
        self._dropped_since = ""
        self._drop_error = ""

    @property
    def on_terminal(self) -> bool:
        return self._console and self._stream is not None

    def progress(self, line: str) -> None:
        """Show ``line`` under the records, redrawn in place (a terminal only; never logged)."""
        if not self.on_terminal or line == self._footer:
            return
        self._footer = line
        self._show(f"\r\033[K{line}")

    def reopen(self) -> None:
        """Open the log file again (after logrotate moved it away). If it cannot be opened, the
        records go on to the old file, which says why."""
        if self._log_file is None:
            return
        try:
            fd = open_append(self._log_file)
        except OSError as exc:
            if self._fd is not None:
                self._to_file(
                    self._own(
                        "log_reopen_failed",
                        "error",
                        file=self._log_file,
                        error=exc.strerror or str(exc),
                        message="records go on to the file that was open before",
                    )
                )
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd

    def write(self, record: EventDict) -> None:
        line = _to_json(record) + "\n"
        if self._fd is not None:
            self._to_file(line)
        if self._stream is None:
            return
        if self._console:
            self._show(f"\r\033[K{render(record, color=True, console=True)}\n{self._footer}")
        else:
            self._show(line)

    def _own(self, event: str, level: str, **fields: Any) -> str:
        """A record of the writer's own, for the log file."""
        return _to_json({"event": event, "level": level, "ts": now_iso(), "pipeline": self._pipeline, **fields}) + "\n"

    def _to_file(self, line: str) -> None:
        assert self._fd is not None
        try:
            if self._dropped:
                append_whole(
                    self._fd,
                    self._own(
                        "log_records_dropped",
                        "warning",
                        records=self._dropped,
                        since=self._dropped_since,
                        error=self._drop_error,
                        message=f"{self._dropped} records could not be written to this file ({self._drop_error})",
                    ).encode(),
                )
                self._dropped = 0
            append_whole(self._fd, line.encode())
        except OSError as exc:
            if not self._dropped:
                self._dropped_since, self._drop_error = now_iso(), exc.strerror or str(exc)
            self._dropped += 1

    def _show(self, text: str) -> None:
        """To the stream: its own descriptor when it has one (see ``write_all``)."""
        stream = self._stream
        if stream is None:
            return
        try:
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):  # a stream with no descriptor (tests)
                stream.write(text)
                stream.flush()
                return
            stream.flush()
            write_all(fd, text.encode(errors="backslashreplace"))
        except OSError as exc:
            if exc.errno in _CONSOLE_GONE:
                self._stream = None
                self._footer = ""
                if self._fd is not None:
                    self._to_file(
                        self._own(
                            "console_lost",
                            "warning",
                            error=exc.strerror or str(exc),
                            message="standard error is gone; records go on to this file only",
                        )
                    )

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
    defer("asyncio")
    defer("uuid")  # for ``structlog.threadlocal``, deprecated, which procd does not use
    import structlog

    out = stream if stream is not None else sys.stderr
    writer = RecordWriter(out, log_file, console=out.isatty(), pipeline=pipeline)
    logger = structlog.wrap_logger(
        writer,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _hand_over,
        ],
    )
    return logger.bind(pipeline=pipeline), writer
