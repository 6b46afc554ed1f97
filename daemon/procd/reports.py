"""Worker reports: what a worker tells its supervisor, declared once and used by both sides.

A leaf module. Each report is a frozen dataclass; the worker ``encode``s it as one JSON line on
its report pipe and the supervisor ``decode``s the line back into the same class, so a kind is
never a string literal repeated in two processes and a field cannot be misspelt on one side only.
A line is kept short enough (well under ``PIPE_BUF``) to be written atomically. The classes are
``frozen.frozen_dataclass``es: a spawned worker imports this module, and defining them compiles
nothing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from procd.frozen import frozen_dataclass


@frozen_dataclass(frozen=True)
class WorkerReady:
    """The worker finished its set-up (imports, exec) and is processing."""

    kind: ClassVar[str] = "ready"


@frozen_dataclass(frozen=True)
class Error:
    """Stage code raised: while starting (the worker then exits 1), or on an item."""

    kind: ClassVar[str] = "error"
    error_type: str
    error: str
    item: str | None = None  # the item's repr, cut short
    traceback: str = ""


@frozen_dataclass(frozen=True)
class ExecFailed:
    """A program (a command stage's, or a spawned interpreter) could not be executed."""

    kind: ClassVar[str] = "exec_failed"
    errno: int
    error: str
    program: str


@frozen_dataclass(frozen=True)
class Counts:
    """Items this process has taken in and handed on so far."""

    kind: ClassVar[str] = "counts"
    items_in: int
    items_out: int


@frozen_dataclass(frozen=True)
class DeadLettered:
    """An item was set aside in the dead-letter file (or could not be: see ``file``)."""

    kind: ClassVar[str] = "dead_lettered"
    error_type: str
    error: str
    attempts: int
    file: str
    item: Any = None  # the item itself, when it is JSON and short (deadletters.item_fields)
    item_json_start: str | None = None  # the start of its JSON text, when it is long
    item_repr: str | None = None  # its repr, when it is not JSON

    def fields(self) -> dict[str, Any]:
        """The report's fields with the item in the one form it was sent in (an item that is
        JSON ``null`` shows as ``item``)."""
        shown = dataclasses.asdict(self)
        for name in ("item_json_start", "item_repr"):
            if shown[name] is None:
                del shown[name]
        if "item_json_start" in shown or "item_repr" in shown:
            del shown["item"]
        return shown


Report = WorkerReady | Error | ExecFailed | Counts | DeadLettered
_KINDS: dict[str, type[Report]] = {cls.kind: cls for cls in (WorkerReady, Error, ExecFailed, Counts, DeadLettered)}


def encode(report: Report) -> bytes:
    """One line: ``{"kind": ..., fields...}``; values JSON cannot hold are written as their repr."""
    fields = {"kind": report.kind, **dataclasses.asdict(report)}
    return (json.dumps(fields, default=repr, separators=(",", ":")) + "\n").encode()


def decode(line: str) -> Report:
    """The report on one line.

    Raises:
        ValueError: not a JSON object, an unknown kind, or fields that kind does not have (the
            message says which).
    """
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"expected a JSON object, got {type(fields).__name__}")
    kind = fields.pop("kind", None)
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown report kind {kind!r}; kinds are {', '.join(sorted(_KINDS))}")
    try:
        report = cls(**fields)
    except TypeError as exc:
        raise ValueError(f"{kind}: {exc}") from None
    for field in dataclasses.fields(report):
        value = getattr(report, field.name)
        accepted = _ACCEPTED.get(str(field.type), object)
        if not isinstance(value, accepted) or (isinstance(value, bool) and accepted is int):
            raise ValueError(f"{kind}: {field.name} must be {field.type}, got {value!r}")
    return report


# The annotations above, as the types a decoded value must have.
_ACCEPTED: dict[str, type | tuple[type, ...]] = {"int": int, "str": str, "str | None": (str, type(None))}
