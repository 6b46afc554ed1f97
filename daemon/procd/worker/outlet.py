"""A worker's results on their way downstream: the ``Outlet`` that batches and sends them, and the
``Ticker`` thread that flushes a part-filled batch and reports counts while the stage code runs.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from procd import reports
from procd.context import Output
from procd.transport import EncodeError, Writer
from procd.transport.slot import SlotFile
from procd.worker.reporter import COUNTS_INTERVAL_S, Reporter, report_error

# The source of outputs that stand for themselves (a producer's items, a command's lines, what a
# class's ``close`` returns): one that cannot be sent is set aside on its own.
ITSELF: Any = object()
# What to do with an item whose output cannot be sent: (source item, why).
Unsendable = Callable[[Any, str], None]


class Outlet:
    """Collects a worker's results and sends them downstream in batches (fan-out: to every reader).

    A sink has no writers: its results are only counted. ``flush`` is serialised by ``lock``, so a
    producer's flusher thread (``Ticker``) and its main loop can both flush.

    Discussion. An output that a writer cannot encode (a lambda, an open file: pickle cannot take
    it) must not take its neighbours down with it. Encoding every output on its own as it is
    produced would double the cost of the normal path; instead a flush encodes the whole batch for
    every output first (the writer names the item it cannot encode, see
    ``transport.EncodeError``), sets that item aside, encodes again, and only then sends: nothing
    is sent twice, and the outputs of one input item go to every output or to none. It is the
    input item that is dead-lettered, with all its outputs, so that replaying it repeats nothing.

    Which input item produced which output is kept for that, at the cost of one append per output
    on the hot path: ``sources[k]`` is the input item whose attempt produced ``pending[k]``;
    an output past the end of ``sources``, or whose entry is ``ITSELF``, stands for itself (a
    producer's items, a command's lines: they are appended to ``pending`` alone). An attempt
    that produced more than one output (a generator) is also recorded in ``groups`` as its
    range in ``pending``, so that all of its outputs, and only they, are set aside together
    (the same object may be attempted twice in a batch: a pickle keeps shared references).
    """

    def __init__(
        self, outputs: tuple[Output, ...], slot: SlotFile | None = None, unsendable: Unsendable | None = None
    ) -> None:
        self._writers = [(o.endpoint.writer(slot, number), o.batch, o.stage) for number, o in enumerate(outputs)]
        self.pending: list[Any] = []
        self.sources: list[Any] = []  # the input item of each output of pending, see the class docstring
        self.groups: list[tuple[int, int]] = []  # ranges in pending of an attempt's several outputs
        self.largest = max((o.batch for o in outputs), default=4096)
        self.sent = 0
        self.lock = threading.Lock()
        self._unsendable = unsendable

    @property
    def count(self) -> int:
        """Items emitted so far, sent or pending."""
        return self.sent + len(self.pending)

    def add(self, item: Any) -> None:
        """One output that stands for itself."""
        pending = self.pending
        pending.append(item)
        if len(pending) >= self.largest:
            self.flush()

    def extend(self, items: list[Any]) -> None:
        """Outputs that each stand for themselves (a command's lines)."""
        pending = self.pending
        pending += items
        if len(pending) >= self.largest:
            self.flush()

    def align(self) -> None:
        """Make ``sources`` as long as ``pending`` (the outputs not yet covered stand for
        themselves), so that a hot loop may append to both side by side."""
        missing = len(self.pending) - len(self.sources)
        if missing > 0:
            self.sources += [ITSELF] * missing

    def hand_on(self, source: Any, outputs: list[Any]) -> None:
        """The outputs of one completed attempt on ``source`` (an input item, or ``ITSELF``)."""
        if not outputs:
            return
        pending = self.pending
        if source is not ITSELF:
            self.align()
            if len(outputs) > 1:
                self.groups.append((len(pending), len(pending) + len(outputs)))
            self.sources += [source] * len(outputs)
        pending += outputs
        if len(pending) >= self.largest:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            # emptied in place: a producer's or a consumer's hot loop holds on to these lists
            pending = self.pending[:]
            del self.pending[: len(pending)]
            sources = self.sources[: len(pending)]
            self.sources.clear()
            groups = self.groups[:]
            self.groups.clear()
            if not pending:
                return
            pending, messages = self._encode(pending, sources, groups)
            self.sent += len(pending)
            for writer, count, payload in messages:
                writer.send_encoded(count, payload)

    def _encode(
        self, pending: list[Any], sources: list[Any], groups: list[tuple[int, int]]
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
            pending, sources, groups = self._set_aside(pending, sources, groups, *culprit)

    def _set_aside(
        self,
        pending: list[Any],
        sources: list[Any],
        groups: list[tuple[int, int]],
        position: int,
        stage: str,
        exc: EncodeError,
    ) -> tuple[list[Any], list[Any], list[tuple[int, int]]]:
        """Remove the outputs of the item whose output at ``position`` cannot be sent, and say so."""
        assert self._unsendable is not None
        source = sources[position] if position < len(sources) else ITSELF
        low, high = position, position + 1
        if source is ITSELF:
            source = pending[position]
        else:
            at = bisect.bisect_right(groups, position, key=lambda group: group[0]) - 1
            if at >= 0 and groups[at][0] <= position < groups[at][1]:
                low, high = groups[at]
        self._unsendable(
            source,
            f"an output of this item cannot be sent to stage {stage}: {type(exc.cause).__name__}: {exc.cause}",
        )
        removed = high - low
        kept = [(a, b) if a < low else (a - removed, b - removed) for a, b in groups if (a, b) != (low, high)]
        return pending[:low] + pending[high:], sources[:low] + sources[high:], kept

    def close(self) -> None:
        self.flush()
        for writer, _batch, _stage in self._writers:
            writer.close()


class Ticker:
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

    The producer takes a batch's first item alone, then the rest in one C-level ``extend``
    through ``permits`` (no Python runs per item but the generator's own). Whenever the ticker
    sends a part-filled batch it first takes the current permits back, so a chunk whose later
    items nobody would send ends at its next item; the producer sets ``first_item`` again
    before it waits for another. It sets the event after it has taken the permits, so every
    item of a chunk is covered by a send that starts after the event.
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
        self._permits: list[None] = []
        self._done = False
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._tick()
        except Exception as exc:  # a send that failed: the worker fails, as in its main thread
            report_error(self._reporter, exc)
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
                if outlet is not None:
                    self._permits.clear()
                    if outlet.pending:
                        outlet.flush()
            if now >= due:
                due = now + COUNTS_INTERVAL_S
                counts = self._counts()
                if counts != reported:
                    reported = counts
                    self._reporter.send(reports.Counts(items_in=counts[0], items_out=counts[1]))

    def permits(self, room: int) -> Iterator[None]:
        """Main thread: ``room`` permits for a producer's items, taken back when the ticker sends
        a part-filled batch (an iteration through them then ends)."""
        self._permits = permits = [None] * max(0, room)
        return iter(permits)

    def stop(self) -> None:
        """Stop the thread (before the worker's last flush and its final counts)."""
        self._done = True
        self.first_item.set()
        self._thread.join()
