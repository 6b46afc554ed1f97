"""Dead-letter files: one JSON object per line for each item a stage gave up on.

A record has the item (as JSON when it can be, with its pickle for an exact replay, or its repr
and the reason when it cannot be serialized), the stage, the error's type, message and a short
traceback, the attempts, and when it happened. Each record is appended whole or not at all
(``log.append_whole`` under an ``flock``, so the processes of a stage can share one file and a
full disk leaves no torn record); a record that cannot be written raises, because an item that
is neither delivered nor dead-lettered must not count as handled. ``read`` gives the records back
for ``procd dlq list`` and ``procd dlq replay``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pickle
from collections.abc import Iterator
from typing import Any

from procd.log import append_whole, now_iso, open_append

__all__ = ["DeadLetterFile", "item_fields", "item_of", "item_text", "now_iso", "read", "record", "replay"]

# An item_dead_lettered record carries the item itself up to this much JSON; past it, the start
# of that JSON (the whole item is in the dead-letter file).
RECORD_ITEM_LIMIT = 1000


def record(item: Any, **fields: Any) -> dict[str, Any]:
    """A dead-letter record for ``item``; ``fields`` add the stage, error and attempts."""
    entry: dict[str, Any] = {"ts": now_iso(), **fields}
    try:
        json.dumps(item, allow_nan=False)  # NaN and Infinity are not JSON
        entry["item"] = item
    except (TypeError, ValueError, RecursionError) as exc:
        entry["item_repr"] = repr(item)[:10_000]
        entry["item_unserializable"] = f"not JSON: {exc}"
    try:
        entry["item_pickle"] = base64.b64encode(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)).decode()
    except Exception as exc:  # an object pickle refuses (a lock, a socket, a lambda)
        entry["item_unpicklable"] = f"{type(exc).__name__}: {exc}"
        entry.setdefault("item_repr", repr(item)[:10_000])
    return entry


def item_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """The item as an ``item_dead_lettered`` record shows it: ``item`` (the JSON value itself)
    when it is JSON and short, ``item_json_start`` (the start of its JSON text) when it is JSON
    and long, else ``item_repr``."""
    if "item" in entry:
        text = json.dumps(entry["item"], ensure_ascii=False, separators=(",", ":"))
        if len(text) <= RECORD_ITEM_LIMIT:
            return {"item": entry["item"]}
        return {"item_json_start": text[:RECORD_ITEM_LIMIT]}
    return {"item_repr": str(entry.get("item_repr", "?"))[:RECORD_ITEM_LIMIT]}


def item_text(entry: dict[str, Any]) -> str:
    """The item as one short string: its JSON text, else its repr (for a ``worker_error``)."""
    fields = item_fields(entry)
    if "item" in fields:
        return json.dumps(fields["item"], ensure_ascii=False, separators=(",", ":"))
    return str(fields.get("item_json_start") or fields.get("item_repr"))


class DeadLetterFile:
    """Appends records to one file, opened on first use (never on descriptors 0, 1 or 2)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, entry: dict[str, Any]) -> None:
        """Write one record, whole.

        Raises:
            OSError: it could not be written (a full disk, a read-only or missing directory);
                nothing of it is left in the file.
        """
        if self._fd is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._fd = open_append(self.path, 0o640)
        data = (json.dumps(entry, default=repr) + "\n").encode()
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            append_whole(self._fd, data)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


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
