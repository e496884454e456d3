"""The durable feedback dataset: every accepted event once, in SQLite (WAL), keyed by its stream id.

The consumer writes here before it acknowledges the stream, so an event is acknowledged only once it is
on disk; `INSERT OR IGNORE` on the event id makes a redelivered event a no-op instead of a duplicate.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,           -- stream id "<ms>-<seq>"
    ms INTEGER NOT NULL,           -- its two parts, for ordering (text order is wrong: "9-0" > "10-0")
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,            -- ranking | demonstration
    comparison_id TEXT,
    user TEXT,
    policy_version TEXT,
    data TEXT NOT NULL             -- the event as JSON (feedback.models)
);
CREATE INDEX IF NOT EXISTS events_order ON events (ms, seq);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, ms, seq);
"""


@dataclass(frozen=True)
class StoredEvent:
    id: str
    kind: str
    data: dict[str, Any]


class Dataset:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit below
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the consumer acknowledges the stream (NORMAL could lose the
        # last commits on power loss, after Redis was told they were safe).
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def insert(self, events: list[tuple[str, str, str]]) -> int:
        """Write (id, kind, data JSON) rows in one transaction; return how many were new."""
        rows = [_row(event_id, kind, data) for event_id, kind, data in events]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.total_changes
            self.db.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            added = self.db.total_changes - before
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return added

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            row = self.db.execute("SELECT COUNT(*) FROM events").fetchone()
        else:
            row = self.db.execute("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def counts(self) -> dict[str, int]:
        return {kind: n for kind, n in self.db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind")}

    def ids(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT id FROM events ORDER BY ms, seq")]

    def last_id(self) -> str | None:
        row = self.db.execute("SELECT id FROM events ORDER BY ms DESC, seq DESC LIMIT 1").fetchone()
        return str(row[0]) if row else None

    def events(self, kind: str | None = None, after: str | None = None,
               until: str | None = None) -> Iterator[StoredEvent]:  # fmt: skip
        """Events in stream order, optionally of one kind, optionally only those after event id `after` and up to
        event id `until` (included)."""
        conditions: list[str] = ["1"]
        args: list[object] = []
        if kind is not None:
            conditions.append("kind = ?")
            args.append(kind)
        if after is not None:
            conditions.append("(ms, seq) > (?, ?)")
            args += list(event_order(after))
        if until is not None:
            conditions.append("(ms, seq) <= (?, ?)")
            args += list(event_order(until))
        query = f"SELECT id, kind, data FROM events WHERE {' AND '.join(conditions)} ORDER BY ms, seq"
        for event_id, event_kind, data in self.db.execute(query, args):
            yield StoredEvent(event_id, event_kind, json.loads(data))


def event_order(event_id: str) -> tuple[int, int]:
    """A stream id "<ms>-<seq>" as numbers, the order Redis gave the events."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def _row(event_id: str, kind: str, data: str) -> tuple[object, ...]:
    ms, seq = event_order(event_id)
    fields = json.loads(data)
    about = fields.get("comparison") or fields  # a ranking carries its comparison; a demonstration names it
    return (event_id, ms, seq, kind, about.get("id", fields.get("comparison_id")), fields.get("user"),
            about.get("policy_version"), data)  # fmt: skip
