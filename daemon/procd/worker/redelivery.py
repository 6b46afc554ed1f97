"""A batch given to a worker again, and the items a worker gives up on.

A batch redelivered after a crash is retried item by item (careful mode), so the item in hand when
a process died is known; an item that used up its attempts, or whose output cannot be sent, goes
to the stage's dead-letter file. Shared by the function runtime and the command bridge.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from procd import reports
from procd.context import WorkerContext
from procd.transport import Held, deadletters
from procd.transport.deadletters import DeadLetterFile, record
from procd.transport.slot import SlotFile
from procd.worker.outlet import Unsendable
from procd.worker.reporter import DEAD_LETTER_FAILED, Reporter


def unsendable(ctx: WorkerContext, letters: DeadLetterFile, reporter: Reporter) -> Unsendable:
    """Dead-letter an item whose output cannot be sent downstream (see ``Outlet``)."""

    def set_aside(item: Any, why: str) -> None:
        dead_letter(ctx, letters, reporter, item, "UnsendableOutput", why, 1, "")

    return set_aside


def redeliver(
    ctx: WorkerContext,
    held: Held,
    slot: SlotFile,
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
                how = f"killed by {signal_name(held.last_signal)}"
            else:
                how = f"exited with code {held.last_code}"
            dead_letter(
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


def dead_letter(
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
            reports.Error(
                error_type="DeadLetterNotWritten",
                error=f"cannot write a dead letter to {letters.path}: {exc.strerror or exc}",
                item=deadletters.item_text(entry),
            )
        )
        os._exit(DEAD_LETTER_FAILED)
    reporter.send(
        reports.DeadLettered(
            error_type=error_type,
            error=error[:1000],
            attempts=attempts,
            file=letters.path,
            **deadletters.item_fields(entry),
        )
    )


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
