"""A command stage's worker, the bridge: it forks and execs the program, writes each input item to
its stdin as a JSON line, and turns each line of its stdout into an item.

The batch in hand stays in the slot file until it has been handed on (see ``_Feeder``): "handed
on" for a program means it has read the whole batch (its stdin pipe is empty), is asleep reading
stdin, and its stdout up to that point has been sent.
"""

from __future__ import annotations

import errno
import fcntl
import json
import json.scanner
import os
import select
import shutil
import signal
import struct
import sys
import termios
import threading
import time
from _json import encode_basestring_ascii, make_encoder
from itertools import repeat
from typing import Any, cast

from procd import procctl, procinfo, reaper, reports, signals
from procd.context import WorkerContext
from procd.transport import Reader
from procd.transport.deadletters import DeadLetterFile
from procd.transport.slot import SlotFile
from procd.worker.outlet import Outlet, Ticker
from procd.worker.redelivery import dead_letter, redeliver, uncharge, unsendable
from procd.worker.reporter import EXEC_FAILED, Reporter

# The C parts that json.dumps and json.loads use, built once instead of per line (see
# ``_json_lines``, ``_parse_lines``): a line costs about a third of what it did.
_DEFAULT = json.JSONEncoder().default  # raises TypeError for what JSON cannot hold
_SCAN = json.scanner.make_scanner(cast(Any, json.JSONDecoder()))  # (value, end) at an index


def _exec_program(argv: tuple[str, ...], stdin_fd: int, stdout_fd: int, err_w: int, parent: int, start: _Start) -> None:
    """In the program's process: wire stdin/stdout, restore default signals, exec. Never returns.

    This runs in a fork of the bridge, a copy of a supervisor-sized interpreter, in which the
    first write to each page faults and copies it: every Python step here costs far more than it
    would in the bridge (bench/README.md, "Restart"). So the bridge works out beforehand what
    can be (``_Start``), and this does only what must happen in the child.
    """
    try:
        procctl.die_with_parent(signal.SIGKILL, parent)
        # exec itself returns every caught signal to its default; an ignored one stays ignored
        # (Python ignores SIGPIPE and SIGXFSZ) and the mask is inherited: those are reset here
        for signum in start.ignored:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.dup2(stdin_fd, 0)
        os.dup2(stdout_fd, 1)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, start.fd_limit)
        if start.path is not None:
            try:
                os.execve(start.path, argv, start.env)
            except OSError:
                pass  # the search below finds the same file again and raises exec's own error
        os.execvpe(argv[0], argv, start.env)
    except OSError as exc:
        os.write(err_w, str(exc.errno or errno.EIO).encode())
    finally:
        os._exit(EXEC_FAILED)


class _Start:
    """What the program's process needs, worked out in the bridge before it forks: the program's
    path (as ``execvp`` would find it on ``PATH``; None if no executable file is there, and then
    the child's own search reports exec's error), its environment, and the signals this process
    ignores (read from the kernel, so a disposition set outside Python is not missed)."""

    def __init__(self, argv: tuple[str, ...]) -> None:
        self.path = shutil.which(argv[0])
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.ignored = _ignored_signals()
        self.fd_limit = os.sysconf("SC_OPEN_MAX")


def _ignored_signals() -> list[int]:
    """The signals this process ignores (``SigIgn`` in /proc/self/status; without /proc, those
    Python knows it ignores)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"SigIgn:"):
                    mask = int(line.split()[1], 16)
                    return [signum for signum in range(1, signal.NSIG) if mask >> (signum - 1) & 1]
    except OSError:
        pass
    return [signum for signum in signal.valid_signals() if signal.getsignal(signum) == signal.SIG_IGN]


def run_command(ctx: WorkerContext, reporter: Reporter) -> int:
    argv = ctx.stage.command
    assert argv is not None
    stdout_r, stdout_w = os.pipe()
    if ctx.input is not None:
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    else:
        stdin_r, stdin_w = os.open(os.devnull, os.O_RDONLY), -1
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    start = _Start(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _exec_program(argv, stdin_r, stdout_w, err_w, parent, start)
    os.close(err_w)
    os.close(stdin_r)
    os.close(stdout_w)
    # SIGTERM to the whole group (a producer being stopped) is for the program: we follow its
    # lead. SIGTERM to us alone (a reader being retired): stop feeding after the current batch
    # and close the program's stdin, so it ends at its own end of stream.
    stop_fd = signals.stop_fd_on_sigterm()
    failure = os.read(err_r, 64)
    os.close(err_r)
    if failure:
        number = int(failure)
        reporter.send(reports.ExecFailed(errno=number, error=os.strerror(number), program=argv[0]))
        reaper.wait_for(pid)
        return EXEC_FAILED
    reporter.send(reports.WorkerReady())

    slot = SlotFile(ctx.slot_fd) if ctx.slot_fd is not None else None
    if slot is not None:
        slot.input_ended(False)
    outlet = Outlet(ctx.outputs, slot, unsendable(ctx, DeadLetterFile(ctx.stage.dead_letter), reporter))
    feeder: _Feeder | None = None
    collector = _Collector(stdout_r, outlet)
    if ctx.input is not None:
        reader = ctx.input.reader(slot, keep_batch=ctx.stage.redeliver, worker=ctx.index)
        feeder = _Feeder(ctx, reader, slot, pid, stdin_w, collector, reporter)
        threading.Thread(target=feeder.run, args=(stop_fd,), name="feed", daemon=True).start()

    def received() -> int:
        return feeder.received if feeder is not None else 0

    ticker = Ticker(reporter, lambda: (received(), outlet.count))
    collector.run()
    ticker.stop()
    status = reaper.wait_for(pid)
    collector.finish(ended_by_itself=status.signal is None)
    if feeder is not None:
        feeder.program_ended.set()
        # a line of a redelivered batch that the program never read is not charged with its
        # end (``_Feeder.run``): that is written to the slot before this process ends
        feeder.careful_done.wait(CAREFUL_SETTLE_S)
    outlet.close()
    reporter.send(reports.Counts(items_in=received(), items_out=outlet.count))
    if status.signal is not None:
        _die_like(status.signal)
    return status.code or 0


# At most this long the bridge waits, once its program has ended, for the feeder to settle the
# line in hand of a redelivered batch (it writes to a pipe nobody reads: EPIPE at once, unless a
# descendant of the program still holds the pipe without reading it).
CAREFUL_SETTLE_S = 5.0


def _die_like(signum: int) -> None:
    """End this bridge the way its program ended, so the supervisor sees the program's signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # reached only for a signal whose default action is not to end


def _unread(fd: int) -> int:
    """Bytes waiting in pipe ``fd`` (either end)."""
    buffer = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buffer)
    (count,) = struct.unpack("i", buffer)
    return int(count)


class _Collector:
    """The bridge's main thread: each stdout line of the program → one item, sent on in batches.

    Everything read is parsed and, once no more output waits, handed on while ``lock`` is held,
    so that ``drained`` can tell that nothing the program has written is still on its way."""

    def __init__(self, fd: int, outlet: Outlet) -> None:
        self.fd = fd
        self.outlet = outlet
        self.lock = threading.Lock()
        self.partial = b""
        self.closed = False

    def run(self) -> None:
        outlet = self.outlet
        while True:
            select.select([self.fd], [], [])
            with self.lock:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                lines, newline, self.partial = (self.partial + chunk).rpartition(b"\n")
                if newline:
                    outlet.extend(_parse_lines(lines))
                if not _unread(self.fd):
                    outlet.flush()

    def finish(self, *, ended_by_itself: bool) -> None:
        """The program has ended: a last line without an end is an item only if it ended by
        itself; one a signal cut short is part of a batch its successor gets whole. Until this,
        an unfinished line keeps ``drained`` false, so no batch is handed on before it."""
        with self.lock:
            if self.partial and ended_by_itself:
                self.outlet.add(_parse_line(self.partial))
            self.partial = b""
            self.outlet.flush()
            self.closed = True
            os.close(self.fd)

    def drained(self) -> bool:
        """Every byte the program has written to stdout so far has been handed on."""
        with self.lock:
            return self.closed or (not _unread(self.fd) and not self.partial and not self.outlet.pending)


class _Feeder:
    """The bridge's feeding thread: batches → JSON lines on the program's stdin, one batch at a
    time, each held in the slot until it has been handed on.

    Discussion. A program's output lines cannot be matched to its input lines (a filter emits
    fewer, a splitter more), so "handed on" is defined by what the program has consumed: a batch
    is done when the program has read all of its lines (its stdin pipe is empty), then sits
    waiting for more input (it sleeps reading stdin, or in poll or select: it has finished with
    what it read), and every line it wrote to stdout until then has been sent downstream. A
    program killed before that point gets the whole batch again in the slot's next program,
    item by item (so one line that kills the program ``max_attempts`` times is dead-lettered; a
    program that ended before it read any of the line in hand is not charged with it: under load
    a storm of kills can otherwise end three programs still starting up, and dead-letter a line
    none of them saw).
    What a program keeps in its own output buffer is invisible to procd: programs must write
    their output unbuffered or line by line (``python -u``, ``grep --line-buffered``, awk's
    ``fflush()``); ``PYTHONUNBUFFERED=1`` is set for them."""

    def __init__(
        self,
        ctx: WorkerContext,
        reader: Reader,
        slot: SlotFile | None,
        program: int,
        stdin_w: int,
        collector: _Collector,
        reporter: Reporter,
    ) -> None:
        self.ctx = ctx
        self.reader = reader
        self.slot = slot
        self.program = program
        self.stdin_w = stdin_w
        self.collector = collector
        self.reporter = reporter
        self.letters = DeadLetterFile(ctx.stage.dead_letter)
        self.received = 0
        self.written = 0  # bytes of the last ``_write`` that reached the pipe
        self.program_ended = threading.Event()
        self.careful_done = threading.Event()  # past the redelivered batch (or there was none)

    def run(self, stop_fd: int) -> None:
        try:
            try:
                held = self.reader.held()
                if held is not None and self.slot is not None:
                    delivered = redeliver(
                        self.ctx,
                        held,
                        self.slot,
                        lambda item: self._write([item]),
                        self._handed_on,
                        self.letters,
                        self.reporter,
                    )
                    if delivered < 0:
                        if _unread(self.stdin_w) == self.written:
                            uncharge(self.slot)  # it ended without reading any of the line
                        return
                    self.received += delivered
                    self.reader.done()
            finally:
                self.careful_done.set()
            for batch in self.reader.batches(stop_fd):
                self.received += len(batch)
                if not self._write(batch) or not self._handed_on():
                    return  # the program has ended: the batch stays held for the next one
                self.reader.done()
            if self.reader.at_end and self.slot is not None:
                self.slot.input_ended()
        finally:
            os.close(self.stdin_w)

    def _write(self, batch: list[Any]) -> bool:
        try:
            text = _json_lines(batch)
        except Exception:  # an item JSON cannot hold: each on its own, and that one set aside
            lines = []
            for item in batch:
                try:
                    lines.append(json.dumps(item, separators=(",", ":")) + "\n")
                except (TypeError, ValueError) as exc:
                    dead_letter(
                        self.ctx, self.letters, self.reporter, item, type(exc).__name__, f"not JSON: {exc}", 1, ""
                    )
            text = "".join(lines)
        data = memoryview(text.encode())
        self.written = 0
        try:
            while data:
                count = os.write(self.stdin_w, data)
                self.written += count
                data = data[count:]
        except BrokenPipeError:
            return False  # the program closed its stdin; its exit status tells the rest
        return True

    def _handed_on(self) -> bool:
        """Wait until the program has consumed what it was given and its output has gone on;
        False if it ended first."""
        delay = 0.0001
        while not self.program_ended.is_set():
            if (
                not _unread(self.stdin_w)
                and procinfo.waits_on(self.program, 0) is not False
                and self.collector.drained()
            ):
                return True
            time.sleep(delay)  # no kernel event says "this pipe is empty"
            delay = min(delay * 2, 0.005)
        return False


def _json_lines(items: list[Any]) -> str:
    """``items`` as JSON lines, each exactly as ``json.dumps(item, separators=(",", ":"))``
    writes it, through the encoder that ``json.dumps`` itself builds per call (here once per
    batch, with its own circular-reference markers).

    Raises:
        TypeError, ValueError: an item JSON cannot hold (which one is not said).
    """
    if not items:
        return ""
    encode = make_encoder({}, _DEFAULT, encode_basestring_ascii, None, ":", ",", False, False, True)
    return "\n".join(map("".join, map(encode, items, repeat(0)))) + "\n"


def _parse_lines(data: bytes) -> list[Any]:
    """Each line of ``data`` (complete lines, without the last newline) as an item, exactly as
    ``_parse_line`` makes it: a line that is one JSON value and nothing else (the usual case,
    scanned in one pass over the lines) is that value, any other goes through ``_parse_line``.

    Decoding all lines at once gives the same text as line by line: a newline byte is never part
    of a UTF-8 sequence, so a replaced invalid sequence never spans two lines."""
    lines = data.decode("utf-8", errors="replace").split("\n")
    try:
        # A line with no value at its start raises StopIteration, which ends ``map`` early:
        # fewer ends than lines. A value followed by more text ends before its line does.
        items, ends = zip(*map(_SCAN, lines, repeat(0)), strict=True)
        if ends == tuple(map(len, lines)):
            return list(items)
    except Exception:  # JSONDecodeError, or no pair at all (nothing to unpack)
        pass
    return [_parse_text(text) for text in lines]


def _parse_line(raw: bytes) -> Any:
    return _parse_text(raw.decode("utf-8", errors="replace"))


def _parse_text(line: str) -> Any:
    text = line.rstrip("\r")
    try:
        return json.loads(text)
    except ValueError:
        return text
