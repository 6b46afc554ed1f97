"""Extract customers from a CSV file, clean and enrich them in parallel, load them into SQLite.

Bad rows never crash a worker: ``Transform`` counts them, prints one line per rejected row (each
becomes a ``worker_output`` record in procd's log) and a summary when its input ends.
"""

from __future__ import annotations

import csv
import datetime
import sqlite3
from pathlib import Path

COUNTRIES = {
    "BR": "Brazil",
    "DE": "Germany",
    "FR": "France",
    "GB": "United Kingdom",
    "IN": "India",
    "JP": "Japan",
    "NL": "Netherlands",
    "SE": "Sweden",
    "US": "United States",
}
FIELDS = ("id", "name", "email", "country", "signup_date", "amount")


def extract(path: Path):
    """Producer: one dict per CSV row, with its line number. ``path`` is annotated ``Path``, so
    procd passes it made absolute against the pipeline file's directory (pipelines/)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)  # the header
        for line, row in enumerate(reader, start=2):
            yield {"line": line, "fields": row}


class Transform:
    """Parse, validate and enrich one row; returns None for a row it rejects."""

    def __init__(self, min_year: int = 2000):
        self.min_year = min_year
        self.good = 0
        self.bad = 0

    def __call__(self, record):
        try:
            row = self.parse(record["fields"])
        except ValueError as exc:
            self.bad += 1
            print(f"rejected line {record['line']}: {exc}")
            return None
        self.good += 1
        return row

    def parse(self, fields):
        if len(fields) != len(FIELDS):
            raise ValueError(f"expected {len(FIELDS)} fields, got {len(fields)}")
        values = dict(zip(FIELDS, (f.strip() for f in fields), strict=False))
        user, at, domain = values["email"].partition("@")
        if not at or not user or "." not in domain or " " in values["email"]:
            raise ValueError(f"bad email {values['email']!r}")
        if values["country"] not in COUNTRIES:
            raise ValueError(f"unknown country {values['country']!r}")
        try:
            signup = datetime.date.fromisoformat(values["signup_date"])
        except ValueError:
            raise ValueError(f"bad date {values['signup_date']!r}") from None
        if signup.year < self.min_year:
            raise ValueError(f"signup before {self.min_year}")
        try:
            cents = round(float(values["amount"]) * 100)
        except ValueError:
            raise ValueError(f"bad amount {values['amount']!r}") from None
        return {
            "id": int(values["id"]),
            "name": values["name"],
            "email": values["email"].lower(),
            "domain": domain.lower(),
            "country": COUNTRIES[values["country"]],
            "signup_year": signup.year,
            "amount_cents": cents,
        }

    def close(self):
        print(f"transform summary: {self.good} good, {self.bad} rejected")


class Load:
    """Sink: upserts every row into a SQLite table, committing in chunks and at the end."""

    def __init__(self, database: str = "etl.db", chunk: int = 500):
        self.db = sqlite3.connect(database)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT,"
            " domain TEXT, country TEXT, signup_year INTEGER, amount_cents INTEGER)"
        )
        self.chunk = chunk
        self.pending = []
        self.loaded = 0

    def __call__(self, row):
        self.pending.append(row)
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self):
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO customers VALUES"
                " (:id, :name, :email, :domain, :country, :signup_year, :amount_cents)",
                self.pending,
            )
        self.loaded += len(self.pending)
        self.pending = []

    def close(self):
        self.flush()
        total = self.db.execute("SELECT count(*) FROM customers").fetchone()[0]
        self.db.close()
        print(f"load summary: {self.loaded} rows written, {total} in the table")
