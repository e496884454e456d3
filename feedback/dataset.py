"""The durable feedback dataset: every accepted event once, in SQLite (WAL), keyed by its stream id, and every
ranked comparison once, keyed by its id.

The consumer writes here before it acknowledges the stream, so an event is acknowledged only once it is
on disk; `INSERT OR IGNORE` on the event id (on the comparison id) makes a redelivered entry a no-op instead of a
duplicate. Entries are checked against their contract (feedback.events) before they are written; rankings are read
back joined with their comparisons, as typed objects.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from feedback.events import (
    Comparison,
    ComparisonEvent,
    DemonstrationEvent,
    EventError,
    RankingEvent,
    RankingRecord,
    about,
    joined,
    read_event,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,           -- stream id "<ms>-<seq>"
    ms INTEGER NOT NULL,           -- its two parts, for ordering (text order is wrong: "9-0" > "10-0")
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,            -- ranking | demonstration
    comparison_id TEXT,
    user TEXT,
    policy_version TEXT,
    data TEXT NOT NULL             -- the event as JSON (feedback.events)
);
CREATE INDEX IF NOT EXISTS events_order ON events (ms, seq);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, ms, seq);
CREATE TABLE IF NOT EXISTS comparisons (  -- each ranked comparison once, however many rankings name it
    id TEXT PRIMARY KEY,           -- the comparison's id (the chat completion's)
    event_id TEXT NOT NULL,        -- the stream entry that brought it
    policy_version TEXT,
    data TEXT NOT NULL             -- the comparison as JSON (feedback.events.Comparison)
);
CREATE TABLE IF NOT EXISTS rejected (  -- entries that broke the contract, kept with the reason
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    why TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredEvent:
    id: str  # the stream id, "<ms>-<seq>"
    kind: str
    event: RankingEvent | DemonstrationEvent


class Dataset:
    def __init__(self, path: Path, busy_ms: int = 10_000) -> None:
        """`busy_ms`: how long a write waits for another writer's lock before SQLite refuses it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit below
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the consumer acknowledges the stream (NORMAL could lose the
        # last commits on power loss, after Redis was told they were safe).
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def insert(self, events: list[tuple[str, str, str]]) -> int:
        """Write (id, kind, data JSON) stream entries in one transaction; return how many events were new (a
        comparison entry goes to the comparisons table and is not counted).

        An entry that breaks the contract (feedback.events) goes to the `rejected` table with the reason instead:
        kept for an operator, and never in the way of the consumer, which would otherwise stop on it at every
        redelivery, nor of the learner."""
        rows, comparisons, rejected = [], [], []
        for event_id, kind, data in events:
            try:
                entry = read_event(event_id, kind, data)
            except EventError as exc:
                log.error("%s; kept in the rejected table", exc)
                rejected.append((event_id, kind, data, str(exc)))
                continue
            if isinstance(entry, ComparisonEvent):
                comparison = entry.comparison
                comparisons.append((comparison.id, event_id, comparison.policy_version, comparison.model_dump_json()))
            else:
                rows.append(_row(event_id, kind, entry, data))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            # Comparisons first: a ranking of the same batch takes its policy version from its comparison.
            self.db.executemany("INSERT OR IGNORE INTO comparisons VALUES (?, ?, ?, ?)", comparisons)
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, "
                "COALESCE(?, (SELECT policy_version FROM comparisons WHERE id = ?)), ?)",
                rows,
            )
            added = self.db.total_changes - before
            self.db.executemany("INSERT OR IGNORE INTO rejected VALUES (?, ?, ?, ?)", rejected)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return added

    def count(self, kind: str | None = None, after: str | None = None) -> int:
        """Events, optionally of one kind and after event id `after`, counted in SQL (nothing decoded)."""
        where, args = _where(kind, after, None)
        return int(self.db.execute(f"SELECT COUNT(*) FROM events WHERE {where}", args).fetchone()[0])

    def rejected(self) -> list[tuple[str, str]]:
        """(id, why) of the entries set aside for breaking the contract, in stream order."""
        rows = self.db.execute("SELECT id, why FROM rejected").fetchall()
        return sorted(((str(i), str(why)) for i, why in rows), key=lambda row: event_order(row[0]))

    def counts(self) -> dict[str, int]:
        return {kind: n for kind, n in self.db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind")}

    def comparison_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0])

    def ids(self, kind: str | None = None) -> list[str]:
        """Event ids in stream order, optionally of one kind (nothing decoded)."""
        where, args = _where(kind, None, None)
        return [row[0] for row in self.db.execute(f"SELECT id FROM events WHERE {where} ORDER BY ms, seq", args)]

    def last_id(self) -> str | None:
        row = self.db.execute("SELECT id FROM events ORDER BY ms DESC, seq DESC LIMIT 1").fetchone()
        return str(row[0]) if row else None

    def events(
        self, kind: str | None = None, after: str | None = None, until: str | None = None
    ) -> Iterator[StoredEvent]:
        """Typed events in stream order, optionally of one kind, optionally only those after event id `after` and
        up to event id `until` (included); a ranking joined with its comparison. A ranking whose comparison is not
        here yet (another consumer of the group still holds it) is passed over, with a warning."""
        where, args = _where(kind, after, until)
        query = (
            "SELECT e.id, e.kind, e.data, c.data FROM events e "
            f"LEFT JOIN comparisons c ON e.kind = 'ranking' AND c.id = e.comparison_id WHERE {where} ORDER BY ms, seq"
        )
        missing = 0
        for event_id, event_kind, data, comparison in self.db.execute(query, args):
            event = read_event(event_id, event_kind, data)
            if isinstance(event, RankingRecord):
                if comparison is None:
                    missing += 1
                    continue
                event = joined(event, Comparison.model_validate_json(comparison))
            assert not isinstance(event, ComparisonEvent)  # never stored among the events
            yield StoredEvent(event_id, event_kind, event)
        if missing:
            log.warning("%d rankings passed over: their comparisons are not in the dataset yet", missing)

    def rankings(self, after: str | None = None, until: str | None = None) -> Iterator[tuple[str, RankingEvent]]:
        """(id, event) of the ranking events, as `events` chooses them."""
        for stored in self.events("ranking", after, until):
            assert isinstance(stored.event, RankingEvent)  # read_event checked the kind
            yield stored.id, stored.event

    def demonstrations(self, until: str | None = None) -> Iterator[tuple[str, DemonstrationEvent]]:
        for stored in self.events("demonstration", until=until):
            assert isinstance(stored.event, DemonstrationEvent)
            yield stored.id, stored.event


def event_order(event_id: str) -> tuple[int, int]:
    """A stream id "<ms>-<seq>" as numbers, the order Redis gave the events."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def _where(kind: str | None, after: str | None, until: str | None) -> tuple[str, list[object]]:
    """The WHERE clause (and its arguments) of events of `kind`, after event `after`, up to event `until`."""
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
    return " AND ".join(conditions), args


def _row(
    event_id: str, kind: str, event: RankingRecord | RankingEvent | DemonstrationEvent, data: str
) -> tuple[object, ...]:
    """The events table's row; its policy version, where None, is looked up from the comparison id (the last
    but one value) on insert."""
    ms, seq = event_order(event_id)
    comparison_id, policy_version = about(event)
    return event_id, ms, seq, kind, comparison_id, event.user, policy_version, comparison_id, data
