"""Dead-letter files: one JSON object per line for each item a stage gave up on.

A record has the item (as JSON when it can be, with its pickle for an exact replay, or its repr
and the reason when it cannot be serialized), the stage, the error's type, message and a short
traceback, the attempts, and when it happened. Each record is one ``write(2)`` on a descriptor
opened with ``O_APPEND``, so the processes of a stage can share one file. ``read`` gives them
back for ``procd dlq list`` and ``procd dlq replay``.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import pickle
from collections.abc import Iterator
from typing import Any


def now_iso() -> str:
    """The current UTC time as the records write it."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def record(item: Any, **fields: Any) -> dict[str, Any]:
    """A dead-letter record for ``item``; ``fields`` add the stage, error and attempts."""
    entry: dict[str, Any] = {"ts": now_iso(), **fields}
    try:
        json.dumps(item)
        entry["item"] = item
    except (TypeError, ValueError) as exc:
        entry["item_repr"] = repr(item)[:10_000]
        entry["item_unserializable"] = f"not JSON: {exc}"
    try:
        entry["item_pickle"] = base64.b64encode(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)).decode()
    except Exception as exc:  # an object pickle refuses (a lock, a socket, a lambda)
        entry["item_unpicklable"] = f"{type(exc).__name__}: {exc}"
        entry.setdefault("item_repr", repr(item)[:10_000])
    return entry


class DeadLetterFile:
    """Appends records to one file, opened on first use."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.write(self._fd, (json.dumps(entry, default=repr) + "\n").encode())


def read(path: str) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, record) for each line; the record is None for a line that is not one."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                yield number, None
                continue
            yield number, entry if isinstance(entry, dict) else None


def item_of(entry: dict[str, Any]) -> tuple[bool, Any]:
    """(True, the item) when the record can give it back, else (False, the reason)."""
    if "item_pickle" in entry:
        try:
            return True, pickle.loads(base64.b64decode(entry["item_pickle"]))
        except Exception as exc:
            return False, f"its pickle cannot be loaded here: {type(exc).__name__}: {exc}"
    if "item" in entry:
        return True, entry["item"]
    return False, entry.get("item_unpicklable") or entry.get("item_unserializable") or "the record has no item"


def replay(path: str) -> Iterator[Any]:
    """A producer stage for ``procd dlq replay --pipeline``: every item the file can give back."""
    for _number, entry in read(path):
        if entry is not None:
            ok, item = item_of(entry)
            if ok:
                yield item
