"""The SQLite backend (``queue = { backend = "sqlite" }``): a stage input that survives a restart
of procd itself.

Discussion. The local backend still carries the traffic: its socket pair says *which* batch is
ready (a row message: the row id, the doorbell) and gives the end of stream, and its eventfd is
the bound. The batches themselves are rows, written in WAL mode before their doorbell is rung and
deleted only when the reader has handed every output on (the acknowledgement). A reader receives
the doorbell straight into its slot file like any message, so a reader killed after it took a
doorbell leaves the row id where the slot's next process finds it and delivers the row within
the same run. When procd starts, every row still there (written by a run that was killed) is rung
again: nothing that entered the queue and was not acknowledged is lost. A row holds its item
count beside the pickle, so ringing it again needs no unpickling.

Each process opens its own connection (a connection must not cross ``fork``).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
from dataclasses import dataclass
from typing import Any

from procd.config import QueueSpec
from procd.errors import StoreError
from procd.transport import Reader, Writer
from procd.transport.local import (
    LocalEndpoint,
    LocalInput,
    LocalReader,
    LocalWriter,
    make_spill_dir,
    open_pair,
)
from procd.transport.slot import MESSAGE, ROW, SlotFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL,
    claimed_by INTEGER,
    deliveries INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL DEFAULT (julianday('now'))
)
"""
_ROW_ID = struct.Struct("<q")


class Store:
    """One connection to one durable queue's database."""

    def __init__(self, path: str, *, timeout_s: float = 10.0) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}
            if "items" not in columns:  # a database written by an earlier procd
                self._db.execute("ALTER TABLE batches ADD COLUMN items INTEGER NOT NULL DEFAULT 0")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot use the SQLite queue {path}: {exc}") from None

    def insert(self, payload: bytes, items: int) -> int:
        cursor = self._db.execute("INSERT INTO batches (payload, items) VALUES (?, ?)", (payload, items))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def claim(self, row: int, pid: int) -> bytes | None:
        """Take row ``row`` for ``pid`` (its doorbell was received by this slot); None if it is
        gone (acknowledged just before the process that held it was killed)."""
        cursor = self._db.execute(
            "UPDATE batches SET claimed_by = ?, deliveries = deliveries + 1 WHERE id = ? RETURNING payload",
            (pid, row),
        )
        found = cursor.fetchone()
        return None if found is None else bytes(found[0])

    def ack(self, row: int) -> None:
        self._db.execute("DELETE FROM batches WHERE id = ?", (row,))

    def recover(self) -> list[tuple[int, int]]:
        """At start: release every claim (their processes are gone); the waiting rows and their
        item counts."""
        try:
            self._db.execute("UPDATE batches SET claimed_by = NULL WHERE claimed_by IS NOT NULL")
            return [(row, items) for (row, items) in self._db.execute("SELECT id, items FROM batches ORDER BY id")]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use the SQLite queue {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class SqliteEndpoint(LocalEndpoint):
    store_path: str = ""

    @property
    def durable(self) -> bool:
        return True

    def writer(self, slot: SlotFile | None = None, token: int = 0) -> Writer:
        return SqliteWriter(self, slot, token)

    def reader(self, slot: SlotFile | None = None, *, keep_batch: bool = True, worker: int = 0) -> Reader:
        return SqliteReader(self, slot, keep_batch=keep_batch)


class SqliteInput(LocalInput):
    def attach(self) -> tuple[dict[str, Any], tuple[int, ...]]:
        endpoint = self.fds
        assert isinstance(endpoint, SqliteEndpoint)
        fields = {"backend": "sqlite", "spill_dir": endpoint.spill_dir, "store": endpoint.store_path}
        return fields, (endpoint.write_fd, endpoint.slots_fd)


def create(stage: str, spec: QueueSpec) -> SqliteInput:
    """The rows an earlier run left are announced again, and count against the bound.

    Raises:
        StoreError: the database cannot be used.
    """
    assert spec.path is not None
    store = Store(spec.path, timeout_s=2.0)
    try:
        waiting = store.recover()
    finally:
        store.close()
    write_fd, read_fd, slots_fd = open_pair(max(0, spec.slots - len(waiting)))
    with socket.socket(
        fileno=os.dup(write_fd)
    ) as sock:  # the socket buffer holds far more doorbells than a queue has slots
        for row, items in waiting:
            body = _ROW_ID.pack(row)
            sock.sendmsg([MESSAGE.pack(ROW, items, len(body)), body], [], socket.MSG_DONTWAIT)
    spill_dir = make_spill_dir(stage)
    endpoint = SqliteEndpoint(write_fd, read_fd, slots_fd, spill_dir, store_path=spec.path)
    return SqliteInput(stage, spec, fds=endpoint, write_inode=os.fstat(write_fd).st_ino)


def attached_writer(fields: dict[str, Any], fds: list[int]) -> Writer:
    endpoint = SqliteEndpoint(fds[0], -1, fds[1], str(fields["spill_dir"]), store_path=str(fields["store"]))
    return SqliteWriter(endpoint, None, 0, owns_slots_fd=True)


class SqliteWriter(LocalWriter):
    """Writes each batch as a row, then rings its doorbell."""

    def __init__(
        self, endpoint: SqliteEndpoint, slot: SlotFile | None, token: int, *, owns_slots_fd: bool = False
    ) -> None:
        super().__init__(endpoint, slot, token, owns_slots_fd=owns_slots_fd)
        self._store_path = endpoint.store_path
        self._store: Store | None = None  # opened on first send

    def send_encoded(self, count: int, payload: bytes) -> None:
        if self._store is None:
            self._store = Store(self._store_path)
        row = self._store.insert(payload, count)
        self._message(ROW, count, _ROW_ID.pack(row))

    def close(self) -> None:
        super().close()
        if self._store is not None:
            self._store.close()


class SqliteReader(LocalReader):
    """Receives doorbells into the slot, loads and acknowledges rows."""

    def __init__(self, endpoint: SqliteEndpoint, slot: SlotFile | None, *, keep_batch: bool = True) -> None:
        super().__init__(endpoint, slot, keep_batch=keep_batch)
        self._store = Store(endpoint.store_path)
        self._row = 0  # the row of the batch in hand

    def _load_other(self, kind: int, body: bytes | memoryview) -> list[Any]:
        import pickle

        if kind != ROW:
            return super()._load_other(kind, body)
        (row,) = _ROW_ID.unpack(body)
        payload = self._store.claim(row, os.getpid())
        if payload is None:
            raise FileNotFoundError(f"row {row} is gone")
        self._row = row
        items: list[Any] = pickle.loads(payload)
        return items

    def receive(self, stop_fd: int | None = None) -> list[Any] | None:
        while True:
            try:
                return super().receive(stop_fd)
            except FileNotFoundError:  # rung twice (at start, and by a writer killed mid-send)
                self.done()

    def done(self) -> None:
        if self._row:
            self._store.ack(self._row)
            self._row = 0
        super().done()

    def close(self) -> None:
        super().close()
        self._store.close()
