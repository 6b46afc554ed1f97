"""What runs inside a worker process, after ``fork`` (or in a fresh interpreter, for spawn).

A function stage's worker imports its code, then loops: receive a batch, call the code per item,
hand the results on in batches to every downstream queue. A command stage's worker is a bridge:
it forks and execs the program, writes each input item to its stdin as a JSON line, and turns each
line of its stdout into an item. Either way the worker tells the supervisor what happened through
its report pipe (one JSON object per line): ``ready``, ``error``, ``exec_failed``, ``counts``.
Queues are reached only through ``transport``; the batch in hand stays in the slot file until it
has been handed on, for a command stage too (see ``_Feeder``).

Descriptors: once the worker has its endpoints, every descriptor procd gave it is made
close-on-exec, so a program the stage code starts (``subprocess``, ``os.system``) never holds a
queue open. A child the stage code *forks* without exec inherits them: it must not outlive the
worker (procd names such a holder in an ``input_held_open`` record when a downstream input cannot
end).

The worker never returns into the supervisor's code: ``spawn`` calls ``run`` inside
``try/finally: os._exit``.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import math
import os
import select
import signal
import struct
import sys
import termios
import threading
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from procd import callables, deadletters, procctl, procinfo, reaper
from procd.config import StageSpec
from procd.deadletters import DeadLetterFile, now_iso, record
from procd.transport import EncodeError, Endpoint, Held, Reader, Writer
from procd.transport.slot import Slot

# A worker whose counts changed tells the supervisor at least this often (for ``procd status``,
# ``top``, metrics), however it batches; an idle one says nothing, so an idle pipeline never
# wakes the supervisor.
COUNTS_INTERVAL_S = 1.0
EXEC_FAILED = 127
DEAD_LETTER_FAILED = 74  # EX_IOERR: a dead letter could not be written


@dataclass(frozen=True)
class Output:
    """One downstream input and the batch size its reader asked for."""

    endpoint: Endpoint
    batch: int
    stage: str = ""  # the reading stage, for messages


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker needs, as plain data (it crosses ``exec`` for spawn)."""

    pipeline: str
    base_dir: str
    stage: StageSpec
    index: int
    generation: int
    report_fd: int
    input: Endpoint | None
    outputs: tuple[Output, ...]
    slot_fd: int | None = None  # the slot file (transport.slot)
    state_dir: str = ""

    @property
    def title(self) -> str:
        return f"procd: {self.pipeline}/{self.stage.name}[{self.index}]"


class Reporter:
    """Writes report records to the supervisor; each is one line, short enough to be atomic."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **fields}, default=repr) + "\n"
        try:
            os.write(self._fd, line.encode())
        except BrokenPipeError:  # the supervisor is gone; PDEATHSIG will end us too
            pass


# The source of outputs that stand for themselves (a producer's items, a command's lines, what a
# class's ``close`` returns): one that cannot be sent is set aside on its own.
ITSELF: Any = object()
# What to do with an item whose output cannot be sent: (source item, why).
Unsendable = Callable[[Any, str], None]


class Outlet:
    """Collects a worker's results and sends them downstream in batches (fan-out: to every reader).

    A sink has no writers: its results are only counted. ``flush`` is serialised by ``lock``, so a
    producer's flusher thread (``_Ticker``) and its main loop can both flush.

    Discussion. An output that a writer cannot encode (a lambda, an open file: pickle cannot take
    it) must not take its neighbours down with it. Encoding every output on its own as it is
    produced would double the cost of the normal path; instead a flush encodes the whole batch for
    every output first (the writer names the item it cannot encode, see
    ``transport.EncodeError``), sets that item aside, encodes again, and only then sends: nothing
    is sent twice, and the outputs of one input item go to every output or to none. ``sources``
    says which input item produced which outputs (one entry per input item, not per output): it
    is the input item that is dead-lettered, with all its outputs, so that replaying it repeats
    nothing.
    """

    def __init__(
        self, outputs: tuple[Output, ...], slot: Slot | None = None, unsendable: Unsendable | None = None
    ) -> None:
        self._writers = [(o.endpoint.writer(slot, number), o.batch, o.stage) for number, o in enumerate(outputs)]
        self.pending: list[Any] = []
        self.sources: list[tuple[int, Any]] = []  # (offset in pending, input item) per attempt
        self.largest = max((o.batch for o in outputs), default=4096)
        self.sent = 0
        self.lock = threading.Lock()
        self._unsendable = unsendable

    @property
    def count(self) -> int:
        """Items emitted so far, sent or pending."""
        return self.sent + len(self.pending)

    def add(self, item: Any) -> None:
        pending = self.pending
        if self.sources:
            self.sources.append((len(pending), ITSELF))
        pending.append(item)
        if len(pending) >= self.largest:
            self.flush()

    def hand_on(self, source: Any, outputs: list[Any]) -> None:
        """The outputs of one completed attempt on ``source`` (an input item, or ``ITSELF``)."""
        if not outputs:
            return
        self.sources.append((len(self.pending), source))
        self.pending += outputs
        if len(self.pending) >= self.largest:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            # emptied in place: a producer's hot loop holds on to this very list
            pending = self.pending[:]
            del self.pending[: len(pending)]
            sources, self.sources = self.sources, []
            if not pending:
                return
            pending, messages = self._encode(pending, sources)
            self.sent += len(pending)
            for writer, count, payload in messages:
                writer.send_encoded(count, payload)

    def _encode(
        self, pending: list[Any], sources: list[tuple[int, Any]]
    ) -> tuple[list[Any], list[tuple[Writer, int, bytes]]]:
        """Every output's batches, encoded, and the outputs they hold (an item that a writer
        cannot encode is set aside)."""
        while True:
            messages: list[tuple[Writer, int, bytes]] = []
            culprit = None
            for writer, batch, stage in self._writers:
                for start in range(0, len(pending), batch):
                    chunk = pending[start : start + batch]
                    try:
                        messages.append((writer, len(chunk), writer.encode(chunk)))
                    except EncodeError as exc:
                        if self._unsendable is None:
                            raise
                        culprit = (start + exc.index, stage, exc)
                        break
                if culprit is not None:
                    break
            if culprit is None:
                return pending, messages
            pending, sources = self._set_aside(pending, sources, *culprit)

    def _set_aside(
        self, pending: list[Any], sources: list[tuple[int, Any]], position: int, stage: str, exc: EncodeError
    ) -> tuple[list[Any], list[tuple[int, Any]]]:
        """Remove the outputs of the item whose output at ``position`` cannot be sent, and say so."""
        assert self._unsendable is not None
        at = bisect.bisect_right(sources, position, key=lambda entry: entry[0]) - 1
        if at < 0 or sources[at][1] is ITSELF:
            low, high, source = position, position + 1, pending[position]
        else:
            low, source = sources[at]
            high = sources[at + 1][0] if at + 1 < len(sources) else len(pending)
        self._unsendable(
            source,
            f"an output of this item cannot be sent to stage {stage}: {type(exc.cause).__name__}: {exc.cause}",
        )
        kept = [
            (offset if offset < high else offset - (high - low), item)
            for offset, item in sources
            if item is ITSELF or not low <= offset < high
        ]
        return pending[:low] + pending[high:], kept

    def close(self) -> None:
        self.flush()
        for writer, _batch, _stage in self._writers:
            writer.close()


class _Ticker:
    """A worker's second thread: reports its counts at least once a second while they change,
    and, in a producer, sends a part-filled batch ``linger_s`` (the stage's ``linger``) after its
    first item, whatever the generator is doing (it may block for minutes before its next yield).

    Discussion. Something other than the next yield must act, or a blocked generator holds its
    items and its counts for ever. A signal (``setitimer``) would interrupt stage code at any
    bytecode, send from inside it and fail its system calls with EINTR; a thread that takes the
    outlet's lock only touches what the main thread shares with it (the pending list, which the
    main thread only appends to, and the writers, which only ``Outlet.flush`` uses under the
    lock). The hot loop pays one ``Event.set`` per part-filled batch, not a clock read per item.
    A flush blocked by a full queue holds the lock, so the main thread blocks at its next full
    batch: backpressure is unchanged. Items are in hand until flushed, as before: a producer
    killed holding them repeats them on restart like everything since its start.
    """

    def __init__(
        self,
        reporter: Reporter,
        counts: Callable[[], tuple[int, int]],
        outlet: Outlet | None = None,
        linger_s: float = 0.0,
    ) -> None:
        self._reporter = reporter
        self._linger_s = linger_s
        self._counts = counts
        self._outlet = outlet
        self.first_item = threading.Event()  # set by a producer on a batch's first item
        self._done = False
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._tick()
        except Exception as exc:  # a send that failed: the worker fails, as in its main thread
            _report_error(self._reporter, exc)
            os._exit(1)

    def _tick(self) -> None:
        reported = (0, 0)
        due = time.monotonic() + COUNTS_INTERVAL_S  # the next counts report
        flush_at = math.inf  # when the part-filled batch goes
        outlet = self._outlet
        while not self._done:
            if self.first_item.wait(max(0.0, min(due, flush_at) - time.monotonic())):
                self.first_item.clear()
                if outlet is not None and flush_at == math.inf:
                    flush_at = time.monotonic() + self._linger_s
            if self._done:
                return
            now = time.monotonic()
            if now >= flush_at:
                flush_at = math.inf
                if outlet is not None and outlet.pending:
                    outlet.flush()
            if now >= due:
                due = now + COUNTS_INTERVAL_S
                counts = self._counts()
                if counts != reported:
                    reported = counts
                    self._reporter.send("counts", items_in=counts[0], items_out=counts[1])

    def stop(self) -> None:
        """Stop the thread (before the worker's last flush and its final counts)."""
        self._done = True
        self.first_item.set()
        self._thread.join()


class _StopProducing(Exception):
    """Raised by the SIGTERM handler while user code runs, to leave a blocked generator."""


def run(ctx: WorkerContext) -> int:
    """Run one worker to its end; return its exit code."""
    _seal(ctx)
    reporter = Reporter(ctx.report_fd)
    if ctx.stage.command is not None:
        return _run_command(ctx, reporter)
    return _run_function(ctx, reporter)


def _seal(ctx: WorkerContext) -> None:
    """Keep procd's descriptors out of every program the worker or its stage code executes
    (``spawn`` made them inheritable to get them across its own exec)."""
    fds = {ctx.report_fd} | ({ctx.slot_fd} if ctx.slot_fd is not None else set())
    if ctx.input is not None:
        fds |= ctx.input.reader_fds()
    for output in ctx.outputs:
        fds |= output.endpoint.writer_fds()
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass


def _report_error(reporter: Reporter, exc: BaseException, item: Any = None) -> None:
    lines = traceback.format_exception(exc)
    reporter.send(
        "error",
        error_type=type(exc).__name__,
        error=str(exc),
        item=repr(item)[:1000] if item is not None else None,
        traceback="".join(lines[-6:])[-4000:],
    )


def _run_function(ctx: WorkerContext, reporter: Reporter) -> int:
    stage = ctx.stage
    assert stage.function is not None
    slot = Slot(ctx.slot_fd) if ctx.slot_fd is not None else None
    if slot is not None:
        slot.input_ended(False)
    letters = DeadLetterFile(stage.dead_letter)
    outlet = Outlet(ctx.outputs, slot, _unsendable(ctx, letters, reporter))
    options = dict(stage.options)
    try:
        target = callables.resolve(stage.function, ctx.base_dir)
        if stage.is_producer and callables.accepts(target, "checkpoint"):
            options["checkpoint"] = Checkpoint.open(ctx, outlet)
        if stage.is_producer and callables.accepts(target, "shard"):
            options["shard"] = callables.Shard(ctx.index, stage.processes)
        instance = target(**options) if callables.is_class(target) else None
    except callables.ResolveError as exc:
        reporter.send("error", error_type="ResolveError", error=str(exc), item=None, traceback="")
        return 1
    except Exception as exc:
        _report_error(reporter, exc)
        return 1
    received = [0]  # a consumer's items in, shared with the ticker thread
    ticker = _Ticker(
        reporter, lambda: (received[0], outlet.count), outlet if stage.is_producer else None, stage.linger_s
    )
    reporter.send("ready")
    try:
        if stage.is_producer:
            code = _produce(target, instance, options, outlet, ticker, reporter)
        else:
            code = _consume(target, instance, ctx, slot, outlet, letters, reporter, received)
    finally:
        ticker.stop()
    if code == 0 and instance is not None and hasattr(instance, "close"):
        try:
            outlet.hand_on(ITSELF, _outputs(instance.close()))
        except Exception as exc:
            _report_error(reporter, exc)
            code = 1
    if code == 0:
        outlet.close()
    reporter.send("counts", items_in=received[0], items_out=outlet.count)
    return code


def _outputs(result: Any) -> list[Any]:
    """What one call handed back, as items: every value a generator yields (all of them, or,
    if it raises, none); None is nothing; anything else is one item."""
    if result is None:
        return []
    if isinstance(result, types.GeneratorType):
        return list(result)
    return [result]


def _unsendable(ctx: WorkerContext, letters: DeadLetterFile, reporter: Reporter) -> Unsendable:
    """Dead-letter an item whose output cannot be sent downstream (see ``Outlet``)."""

    def set_aside(item: Any, why: str) -> None:
        _dead_letter(ctx, letters, reporter, item, "UnsendableOutput", why, 1, "")

    return set_aside


class Checkpoint:
    """A producer's place, kept between runs (a producer asks for it with a ``checkpoint``
    parameter). ``value`` is what the last run saved (None the first time); ``save(value)``
    first hands every item yielded so far on to the durable queues downstream, then writes
    ``value`` (JSON) atomically, so a restarted producer that resumes from ``value`` loses
    nothing (and repeats at most what it yielded after its last save)."""

    def __init__(self, path: str, outlet: Outlet) -> None:
        self.path = path
        self._outlet = outlet
        try:
            with open(path, encoding="utf-8") as fh:
                self.value: Any = json.load(fh)["value"]
        except FileNotFoundError:
            self.value = None

    @classmethod
    def open(cls, ctx: WorkerContext, outlet: Outlet) -> Checkpoint:
        if not ctx.outputs or not all(o.endpoint.durable for o in ctx.outputs):
            raise ValueError(
                f"stage {ctx.stage.name} asks for a checkpoint, so every stage reading it needs a durable queue "
                '(queue = { backend = "sqlite" }): an item in memory could be skipped on resume'
            )
        return cls(os.path.join(ctx.state_dir, f"{ctx.stage.name}.checkpoint.json"), outlet)

    def save(self, value: Any) -> None:
        self._outlet.flush()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as fh:
            json.dump({"value": value}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, self.path)
        self.value = value


def _produce(
    target: Any, instance: Any, options: dict[str, Any], outlet: Outlet, ticker: _Ticker, reporter: Reporter
) -> int:
    stopping = False
    in_user_code = False

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if in_user_code:
            raise _StopProducing

    signal.signal(signal.SIGTERM, on_term)
    source: Any = None
    pending = outlet.pending
    largest = outlet.largest
    first_item = ticker.first_item.set
    try:
        in_user_code = True
        source = instance if instance is not None else target(**options)
        next_item = iter(source if source is not None else ()).__next__
        in_user_code = False
        while not stopping:
            in_user_code = True
            try:
                item = next_item()
            except StopIteration:
                break
            finally:
                in_user_code = False
            # The hot loop of every producer: a full batch is sent here, a part-filled one by the
            # ticker thread ``linger`` after its first item.
            pending.append(item)
            size = len(pending)
            if size >= largest:
                outlet.flush()
            elif size == 1:
                first_item()
    except _StopProducing:
        pass
    except Exception as exc:
        _report_error(reporter, exc)
        return 1
    finally:
        in_user_code = False
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if isinstance(source, types.GeneratorType):
        try:
            source.close()  # runs the generator's own finally blocks
        except Exception as exc:
            _report_error(reporter, exc)
            return 1
    return 0


def stop_fd_on_sigterm() -> int:
    """Make SIGTERM mean "finish the current batch, then end": returns a descriptor that becomes
    readable when SIGTERM arrives (Python's wake-up fd; SIGTERM is the only signal handled)."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    return read_fd


def _consume(
    target: Any,
    instance: Any,
    ctx: WorkerContext,
    slot: Slot | None,
    outlet: Outlet,
    letters: DeadLetterFile,
    reporter: Reporter,
    received: list[int],
) -> int:
    """Process batches until the end of the input (or SIGTERM between batches); ``received[0]``
    counts the items taken in.

    An exception in stage code is retried, alone, up to ``max_attempts`` times, then the item
    goes to the dead-letter file; it never ends the worker. Only an attempt that completes hands
    its outputs on (a generator's values are collected until it returns), so a retry repeats
    nothing. A batch that the slot's previous process held when it died is processed first, one
    item at a time (see ``_redeliver``).
    """
    assert ctx.input is not None
    stage = ctx.stage
    call = instance if instance is not None else target
    options = stage.options if instance is None else {}

    def attempt(item: Any) -> None:
        first_failed_at = None
        for number in range(1, stage.max_attempts + 1):
            try:
                outputs = _outputs(call(item, **options))
            except Exception as exc:
                first_failed_at = first_failed_at or now_iso()
                if number == stage.max_attempts:
                    lines = traceback.format_exception(exc)
                    trace = "".join(lines[-6:])[-4000:]
                    _dead_letter(
                        ctx, letters, reporter, item, type(exc).__name__, str(exc), number, trace, first_failed_at
                    )
                continue
            outlet.hand_on(item, outputs)
            return

    reader = ctx.input.reader(slot, keep_batch=stage.redeliver, worker=ctx.index)
    held = reader.held()
    if held is not None and slot is not None:
        received[0] += _redeliver(ctx, held, slot, attempt, outlet.flush, letters, reporter)
        reader.done()
    for batch in reader.batches(stop_fd_on_sigterm()):
        received[0] += len(batch)
        for item in batch:
            attempt(item)
        outlet.flush()
        reader.done()
    if reader.at_end and slot is not None:
        slot.input_ended()
    return 0


def _redeliver(
    ctx: WorkerContext,
    held: Held,
    slot: Slot,
    attempt: Callable[[Any], object],
    flush: Callable[[], object],
    letters: DeadLetterFile,
    reporter: Reporter,
) -> int:
    """Process the batch a dead predecessor held, item by item, handing each on before the next,
    with the item in hand recorded in the slot: an item that kills processes ``max_attempts``
    times in all is dead-lettered instead of taking the slot down for ever.

    Returns the number of items processed; stops early (returning -1) if ``attempt`` or
    ``flush`` returns False (a command stage's program has ended)."""
    items = held.items
    start, crashes = 0, 0
    if held.index >= 0:
        crashes = held.crashes + 1
        if crashes + 1 >= ctx.stage.max_attempts:  # the first crash, before careful mode, counts too
            if held.last_signal >= 0:
                how = f"killed by {_signal_name(held.last_signal)}"
            else:
                how = f"exited with code {held.last_code}"
            _dead_letter(
                ctx,
                letters,
                reporter,
                items[held.index],
                "WorkerCrashed",
                f"the worker was {how} while processing this item",
                crashes + 1,
                "",
            )
            start, crashes = held.index + 1, 0
        else:
            start = held.index
    for index in range(start, len(items)):
        slot.at(index, crashes if index == held.index else 0)
        if attempt(items[index]) is False or flush() is False:
            return -1
    return len(items) - start


def _dead_letter(
    ctx: WorkerContext,
    letters: DeadLetterFile,
    reporter: Reporter,
    item: Any,
    error_type: str,
    error: str,
    attempts: int,
    trace: str,
    first_failed_at: str | None = None,
) -> None:
    entry = record(
        item,
        pipeline=ctx.pipeline,
        stage=ctx.stage.name,
        worker=ctx.index,
        pid=os.getpid(),
        error_type=error_type,
        error=error,
        traceback=trace,
        attempts=attempts,
        first_failed_at=first_failed_at,
    )
    try:
        letters.append(entry)
    except OSError as exc:
        # Neither delivered nor dead-lettered: the item is not handled. Say so and end this
        # process without acknowledging its batch, which the slot's next process gets again.
        reporter.send(
            "error",
            error_type="DeadLetterNotWritten",
            error=f"cannot write a dead letter to {letters.path}: {exc.strerror or exc}",
            item=deadletters.item_text(entry),
            traceback="",
        )
        os._exit(DEAD_LETTER_FAILED)
    reporter.send(
        "dead_lettered",
        error_type=error_type,
        error=error[:1000],
        attempts=attempts,
        file=letters.path,
        **deadletters.item_fields(entry),
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# -- command stages -------------------------------------------------------------------------------


def _exec_program(argv: tuple[str, ...], stdin_fd: int, stdout_fd: int, err_w: int, parent: int) -> None:
    """In the program's process: wire stdin/stdout, restore default signals, exec. Never returns."""
    try:
        procctl.die_with_parent(signal.SIGKILL, parent)
        for signum in range(1, signal.NSIG):
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        os.dup2(stdin_fd, 0)
        os.dup2(stdout_fd, 1)
        os.environ["PYTHONUNBUFFERED"] = "1"
        os.closerange(3, err_w)
        os.closerange(err_w + 1, os.sysconf("SC_OPEN_MAX"))
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        os.write(err_w, str(exc.errno or errno.EIO).encode())
    finally:
        os._exit(EXEC_FAILED)


def _run_command(ctx: WorkerContext, reporter: Reporter) -> int:
    argv = ctx.stage.command
    assert argv is not None
    stdout_r, stdout_w = os.pipe()
    if ctx.input is not None:
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    else:
        stdin_r, stdin_w = os.open(os.devnull, os.O_RDONLY), -1
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _exec_program(argv, stdin_r, stdout_w, err_w, parent)
    os.close(err_w)
    os.close(stdin_r)
    os.close(stdout_w)
    # SIGTERM to the whole group (a producer being stopped) is for the program: we follow its
    # lead. SIGTERM to us alone (a reader being retired): stop feeding after the current batch
    # and close the program's stdin, so it ends at its own end of stream.
    stop_fd = stop_fd_on_sigterm()
    failure = os.read(err_r, 64)
    os.close(err_r)
    if failure:
        number = int(failure)
        reporter.send("exec_failed", errno=number, error=os.strerror(number), program=argv[0])
        reaper.wait_for(pid)
        return EXEC_FAILED
    reporter.send("ready")

    slot = Slot(ctx.slot_fd) if ctx.slot_fd is not None else None
    if slot is not None:
        slot.input_ended(False)
    outlet = Outlet(ctx.outputs, slot, _unsendable(ctx, DeadLetterFile(ctx.stage.dead_letter), reporter))
    feeder: _Feeder | None = None
    collector = _Collector(stdout_r, outlet)
    if ctx.input is not None:
        reader = ctx.input.reader(slot, keep_batch=ctx.stage.redeliver, worker=ctx.index)
        feeder = _Feeder(ctx, reader, slot, pid, stdin_w, collector, reporter)
        threading.Thread(target=feeder.run, args=(stop_fd,), name="feed", daemon=True).start()

    def received() -> int:
        return feeder.received if feeder is not None else 0

    ticker = _Ticker(reporter, lambda: (received(), outlet.count))
    collector.run()
    ticker.stop()
    status = reaper.wait_for(pid)
    if feeder is not None:
        feeder.program_ended.set()
    outlet.close()
    reporter.send("counts", items_in=received(), items_out=outlet.count)
    if status.signal is not None:
        _die_like(status.signal)
    return status.code or 0


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
                lines = (self.partial + chunk).split(b"\n")
                self.partial = lines.pop()
                for raw in lines:
                    outlet.add(_parse_line(raw))
                if not _unread(self.fd):
                    outlet.flush()
        with self.lock:
            if self.partial:
                outlet.add(_parse_line(self.partial))
                self.partial = b""
            outlet.flush()
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
    item by item (so one line that kills the program ``max_attempts`` times is dead-lettered).
    What a program keeps in its own output buffer is invisible to procd: programs must write
    their output unbuffered or line by line (``python -u``, ``grep --line-buffered``, awk's
    ``fflush()``); ``PYTHONUNBUFFERED=1`` is set for them."""

    def __init__(
        self,
        ctx: WorkerContext,
        reader: Reader,
        slot: Slot | None,
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
        self.program_ended = threading.Event()

    def run(self, stop_fd: int) -> None:
        try:
            held = self.reader.held()
            if held is not None and self.slot is not None:
                delivered = _redeliver(
                    self.ctx,
                    held,
                    self.slot,
                    lambda item: self._write([item]),
                    self._handed_on,
                    self.letters,
                    self.reporter,
                )
                if delivered < 0:
                    return
                self.received += delivered
                self.reader.done()
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
        lines = []
        for item in batch:
            try:
                lines.append(json.dumps(item, separators=(",", ":")) + "\n")
            except (TypeError, ValueError) as exc:
                _dead_letter(self.ctx, self.letters, self.reporter, item, type(exc).__name__, f"not JSON: {exc}", 1, "")
        data = memoryview("".join(lines).encode())
        try:
            while data:
                data = data[os.write(self.stdin_w, data) :]
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


def _parse_line(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    try:
        return json.loads(text)
    except ValueError:
        return text
