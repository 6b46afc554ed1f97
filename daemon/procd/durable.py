"""The SQLite store behind a durable stage input (``queue = { backend = "sqlite" }``).

Discussion. The local transport still carries the traffic: the socket pair says *which* batch is
ready (an 8-byte row id, the doorbell) and gives the end of stream, and the eventfd counts free
capacity. The batches themselves are rows, written in WAL mode before their doorbell is rung and
deleted only when the reader has handed every output on (the acknowledgement). A claim marks a
row with the reader's pid, so a doorbell rung twice is harmless. When procd starts, every row
still there (written by an earlier run that was killed) is unclaimed and rung again: nothing that
entered the queue and was not acknowledged is lost.

Each process opens its own connection (a connection must not cross ``fork``).
"""

from __future__ import annotations

import os
import sqlite3

from procd.errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL,
    claimed_by INTEGER,
    deliveries INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL DEFAULT (julianday('now'))
)
"""


class Store:
    """One connection to one durable queue."""

    def __init__(self, path: str, *, timeout_s: float = 10.0) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot use the SQLite queue {path}: {exc}") from None

    def insert(self, payload: bytes) -> int:
        cursor = self._db.execute("INSERT INTO batches (payload) VALUES (?)", (payload,))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def claim(self, row: int, pid: int) -> bytes | None:
        """Take row ``row`` for ``pid``; None if it is gone or someone else has it."""
        cursor = self._db.execute(
            "UPDATE batches SET claimed_by = ?, deliveries = deliveries + 1"
            " WHERE id = ? AND claimed_by IS NULL RETURNING payload",
            (pid, row),
        )
        found = cursor.fetchone()
        return None if found is None else bytes(found[0])

    def ack(self, row: int) -> None:
        self._db.execute("DELETE FROM batches WHERE id = ?", (row,))

    def recover(self) -> list[int]:
        """At start: release every claim (their processes are gone) and list the waiting rows."""
        try:
            self._db.execute("UPDATE batches SET claimed_by = NULL WHERE claimed_by IS NOT NULL")
            return [row for (row,) in self._db.execute("SELECT id FROM batches ORDER BY id")]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use the SQLite queue {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()
