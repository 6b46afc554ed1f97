"""A function stage's worker: import the stage code, then call it per item (a consumer) or run
its generator (a producer), and hand the results on through the ``Outlet``.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
import types
from types import FrameType
from typing import Any

from procd import callables, reports, signals
from procd.context import WorkerContext
from procd.transport.deadletters import DeadLetterFile, now_iso
from procd.transport.slot import SlotFile
from procd.worker.outlet import ITSELF, Outlet, Ticker
from procd.worker.redelivery import dead_letter, redeliver, unsendable
from procd.worker.reporter import Reporter, report_error


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
                    dead_letter(
                        ctx, letters, reporter, item, type(exc).__name__, str(exc), number, trace, first_failed_at
                    )
                continue
            outlet.hand_on(item, outputs)
            return

    reader = ctx.input.reader(slot, keep_batch=stage.redeliver, worker=ctx.index)
    held = reader.held()
    if held is not None and slot is not None:
        received[0] += redeliver(ctx, held, slot, attempt, outlet.flush, letters, reporter)
        reader.done()
    for batch in reader.batches(signals.stop_fd_on_sigterm()):
        received[0] += len(batch)
        for item in batch:
            attempt(item)
        outlet.flush()
        reader.done()
    if reader.at_end and slot is not None:
        slot.input_ended()
    return 0
