"""A function stage's worker: import the stage code, then call it per item (a consumer) or run
its generator (a producer), and hand the results on through the ``Outlet``.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import signal
import time
import traceback
import types
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, cast

from procd import callables, reports, signals
from procd.context import WorkerContext
from procd.transport.deadletters import DeadLetterFile, now_iso
from procd.transport.slot import SlotFile
from procd.worker.outlet import ITSELF, Outlet, Ticker
from procd.worker.redelivery import dead_letter, redeliver, unsendable
from procd.worker.reporter import Reporter, report_error

_END: Any = object()  # what ``next`` returns when a producer's iterator is exhausted
_SECOND = operator.itemgetter(1)


class _StopProducing(Exception):
    """Raised by the SIGTERM handler while user code runs, to leave a blocked generator."""


def run_function(ctx: WorkerContext, reporter: Reporter) -> int:
    stage = ctx.stage
    assert stage.function is not None
    slot = SlotFile(ctx.slot_fd) if ctx.slot_fd is not None else None
    if slot is not None:
        slot.input_ended(False)
    letters = DeadLetterFile(stage.dead_letter)
    outlet = Outlet(ctx.outputs, slot, unsendable(ctx, letters, reporter))
    options = dict(stage.options)
    try:
        target = callables.resolve(stage.function, ctx.base_dir)
        if stage.is_producer and callables.accepts(target, "checkpoint"):
            options["checkpoint"] = Checkpoint.open(ctx, outlet)
        if stage.is_producer and callables.accepts(target, "shard"):
            options["shard"] = callables.Shard(ctx.index, stage.processes)
        instance = target(**options) if callables.is_class(target) else None
    except callables.ResolveError as exc:
        reporter.send(reports.Error(error_type="ResolveError", error=str(exc)))
        return 1
    except Exception as exc:
        report_error(reporter, exc)
        return 1
    received = [0]  # a consumer's items in, shared with the ticker thread
    ticker = Ticker(
        reporter, lambda: (received[0], outlet.count), outlet if stage.is_producer else None, stage.linger_s
    )
    reporter.send(reports.WorkerReady())
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
            report_error(reporter, exc)
            code = 1
    if code == 0:
        outlet.close()
    reporter.send(reports.Counts(items_in=received[0], items_out=outlet.count))
    return code


def _outputs(result: Any) -> list[Any]:
    """What one call handed back, as items: every value a generator yields (all of them, or,
    if it raises, none); None is nothing; anything else is one item."""
    if result is None:
        return []
    if isinstance(result, types.GeneratorType):
        return list(result)
    return [result]


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
    target: Any, instance: Any, options: dict[str, Any], outlet: Outlet, ticker: Ticker, reporter: Reporter
) -> int:
    """Run a producer's generator, sending its items in batches, until it ends (or SIGTERM).

    Discussion (adaptive batching, as Nagle's algorithm and Kafka's ``linger.ms``). A batch's
    first item is taken alone and the clock read once: if nothing was sent for ``linger``
    (``Outlet.sent_at``), the producer is slow and the item goes at once, from this thread; a
    slow producer's items go one by one with no added wait and no hand-off to the ticker.
    Otherwise a batch is being made: the rest come in one C-level ``extend`` and go when the
    batch is full, or ``linger`` after its first item by the ticker. A fast producer so still
    sends whole batches, with at most one extra send per ``linger`` (a lone first item after a
    pause). The pace is judged from the first send on: the first batch is always made as
    before (a slow producer's first item waits ``linger`` once; a fast one's first batch is
    whole, as readers of ``batch`` expect). The contract stays "a part-filled batch is sent at
    the latest ``linger`` after its first item"; ``linger = 0s`` keeps its meaning (the ticker
    sends at once whatever is pending) and never takes this path, which would make every batch
    a single item.
    """
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
    linger_s = ticker.linger_s
    clock = time.monotonic

    def slow() -> bool:
        """Nothing was sent for ``linger``: no batch is being made (see the docstring)."""
        return bool(linger_s) and clock() - outlet.sent_at >= linger_s

    try:
        in_user_code = True
        source = instance if instance is not None else target(**options)
        items = iter(source if source is not None else ())
        in_user_code = False
        # The hot loop of every producer, once per batch: a full batch is sent here, so is the
        # first item of a slow producer's (nothing sent for linger); any other part-filled one
        # by the ticker thread ``linger`` after the event (see ``Ticker``).
        while not stopping:
            if pending:  # what a chunk the ticker ended left behind (its last item came late)
                if slow():
                    outlet.flush()
                else:
                    first_item()  # it waits no longer than linger
            in_user_code = True  # from here a SIGTERM raises _StopProducing; before, it is seen here:
            if stopping:
                break
            item = next(items, _END)  # a batch's first item, waited for alone
            in_user_code = False
            if item is _END:
                break
            pending.append(item)
            if slow():
                outlet.flush()  # a slow producer's item goes at once
                continue
            permits = ticker.permits(largest - len(pending))
            first_item()
            in_user_code = True
            if stopping:
                break
            pending.extend(map(_SECOND, zip(permits, items, strict=False)))  # the rest: no Python per item
            in_user_code = False
            if len(pending) >= largest:
                outlet.flush()
    except _StopProducing:
        pass
    except Exception as exc:
        report_error(reporter, exc)
        return 1
    finally:
        in_user_code = False
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if isinstance(source, types.GeneratorType):
        try:
            source.close()  # runs the generator's own finally blocks
        except Exception as exc:
            report_error(reporter, exc)
            return 1
    return 0


def _consume(
    target: Any,
    instance: Any,
    ctx: WorkerContext,
    slot: SlotFile | None,
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
    item at a time (see ``redelivery.redeliver``).
    """
    assert ctx.input is not None
    attempts = _Attempts(ctx, _caller(target, instance, ctx.stage.options), outlet, letters, reporter)
    reader = ctx.input.reader(slot, keep_batch=ctx.stage.redeliver, worker=ctx.index)
    held = reader.held()
    if held is not None and slot is not None:
        received[0] += redeliver(ctx, held, slot, attempts.one, outlet.flush, letters, reporter)
        reader.done()
    for batch in reader.batches(signals.stop_fd_on_sigterm()):
        received[0] += len(batch)
        attempts.batch(batch)
        outlet.flush()
        reader.done()
    if reader.at_end and slot is not None:
        slot.input_ended()
    return 0


def _caller(target: Any, instance: Any, options: Mapping[str, Any]) -> Callable[[Any], Any]:
    """The stage code as a call of one item: the instance's ``__call__`` method, or the function
    with its options."""
    if instance is not None:
        return _bound_call(instance)
    return functools.partial(target, **options) if options else cast(Callable[[Any], Any], target)


def _bound_call(instance: Any) -> Callable[[Any], Any]:
    """``instance``'s ``__call__`` bound to it once, as ``instance(item)`` finds it (on its class
    and the class's bases, never on the instance): ``instance(item)`` looks it up and binds it
    again on every call. A ``__call__`` that is not a plain function or a ``staticmethod`` (a C
    type's slot, some other descriptor) is left to that lookup."""
    kind = type(instance)
    for klass in kind.__mro__:
        if "__call__" not in vars(klass):
            continue
        found = vars(klass)["__call__"]
        if isinstance(found, types.FunctionType | staticmethod):
            return cast(Callable[[Any], Any], found.__get__(instance, kind))
        break
    return cast(Callable[[Any], Any], instance)


class _Outputs(list[Any]):
    """The values a generator yielded for one item (a list the stage returned is one item)."""


class _Attempts:
    """Calls the stage code on input items and hands their outputs to the outlet.

    Discussion. This is the consumer's hot path: per item, one call of the stage code and one
    append, in one loop over the batch (``batch``). Everything that exists for failures (the
    retries, the first failure's time, the traceback, the dead letter: ``retry``) runs only
    for an item whose first attempt raised. An exception from the outlet (a send that failed)
    is not the item's: the outlet is called outside the ``try``.
    """

    def __init__(
        self,
        ctx: WorkerContext,
        call: Callable[[Any], Any],
        outlet: Outlet,
        letters: DeadLetterFile,
        reporter: Reporter,
    ) -> None:
        self._ctx = ctx
        self._call = call
        self._outlet = outlet
        self._letters = letters
        self._reporter = reporter
        self._max_attempts = ctx.stage.max_attempts

    def batch(self, items: list[Any]) -> None:
        """Attempt every item of ``items``, in order.

        A returned output costs two appends (the output and its source, see ``Outlet``); the
        outlet's size is not tested per item: ``_consume`` flushes after every batch, so the
        pending outputs of single results are bounded by the batch (a generator's many go
        through ``Outlet.hand_on``, which tests it).
        """
        call = self._call
        outlet = self._outlet
        outlet.align()
        output = outlet.pending.append
        source = outlet.sources.append  # both lists are emptied in place by a flush
        generator = types.GeneratorType
        for item in items:
            try:
                result = call(item)
                if result is None:  # a sink's usual answer: nothing more to look at
                    continue
                if result.__class__ is generator:
                    result = _Outputs(result)
            except Exception as exc:
                self.retry(item, exc)
                continue
            if result.__class__ is _Outputs:
                outlet.hand_on(item, result)
                continue
            source(item)
            output(result)

    def one(self, item: Any) -> None:
        """Attempt one item (a redelivered batch goes item by item)."""
        try:
            outputs = _outputs(self._call(item))
        except Exception as exc:
            self.retry(item, exc)
            return
        self._outlet.hand_on(item, outputs)

    def retry(self, item: Any, failure: Exception) -> None:
        """The item's first attempt raised ``failure``: attempt it again, up to ``max_attempts``
        in all, then dead-letter it with the last exception."""
        first_failed_at = now_iso()
        for _number in range(2, self._max_attempts + 1):
            try:
                outputs = _outputs(self._call(item))
            except Exception as exc:
                failure = exc
                continue
            self._outlet.hand_on(item, outputs)
            return
        lines = traceback.format_exception(failure)
        trace = "".join(lines[-6:])[-4000:]
        dead_letter(
            self._ctx,
            self._letters,
            self._reporter,
            item,
            type(failure).__name__,
            str(failure),
            self._max_attempts,
            trace,
            first_failed_at,
        )
