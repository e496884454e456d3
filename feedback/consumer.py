"""Move feedback events from the Redis stream into the durable dataset, each exactly once.

Order of work, so that nothing is lost and nothing is counted twice:
1. on start, this consumer's own pending entries (read from id 0): delivered before a crash, never acknowledged;
2. entries other consumers left pending longer than `claim_idle_ms` (XAUTOCLAIM): those consumers are dead; looked
   for again every `reclaim_s` while running, since a consumer may die at any time, not only before this one starts;
3. new entries (`>`), blocking.
Each batch is written to the dataset in one transaction first and acknowledged (XACK) after; a crash between the
two redelivers the batch, and `INSERT OR IGNORE` on the event id absorbs it. The stream is trimmed only below
its oldest pending entry (XTRIM MINID), never by length, so nothing unacknowledged is ever trimmed.

A dataset that refuses a write (locked by another writer, disk full) stops nothing: the batch stays pending in
Redis, the consumer waits (longer each time, up to a minute) and starts again from step 1. An entry that breaks the
event contract goes to the dataset's `rejected` table (feedback.dataset), counted by `rankloop feedback stats`.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from deploy.redis_server import as_text
from feedback.dataset import Dataset
from feedback.stream import STREAM_KEY

log = logging.getLogger(__name__)
GROUP = "learner"
RECONNECT_S = 2.0
RECLAIM_S = 30.0  # how often a running consumer looks for entries a dead one left
BACKOFF_S = (1.0, 60.0)  # the first and the longest wait after the dataset refused a batch
Entry = tuple[str, dict[str, str] | None]  # (id, fields); fields None when the entry was deleted


@dataclass(frozen=True)
class AutoClaim:
    cursor: str
    entries: list[Entry]
    deleted: list[str]


def split_autoclaim(reply: list[Any]) -> AutoClaim:
    """XAUTOCLAIM's reply: Redis 6.2 sends [cursor, entries]; 7.0+ adds a third element, the deleted ids."""
    deleted = [as_text(i) for i in reply[2]] if len(reply) > 2 else []
    return AutoClaim(as_text(reply[0]), _entries(reply[1]), deleted)


def default_consumer_name(dataset: Path) -> str:
    """The same name on every restart of the consumer of one dataset on one host: a restarted consumer finds its
    own pending entries at once (step 1) instead of waiting `claim_idle_ms` to claim them from its dead self,
    and the group does not gather a new name per process."""
    where = hashlib.sha256(str(dataset.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{where}"


def group_gone(exc: ResponseError) -> bool:
    """Whether Redis refused for want of the stream or the consumer group (Redis restarted empty, or the stream
    deleted): Redis 6.2 says NOGROUP on the next read; Redis 7 also ends a read blocked on a stream deleted under it
    with `UNBLOCKED the stream key no longer exists`."""
    return "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc)


class FeedbackConsumer:
    def __init__(
        self,
        redis: Redis,
        dataset: Dataset,
        name: str,
        *,
        batch: int = 256,
        claim_idle_ms: int = 60_000,
        stream: str = STREAM_KEY,
        group: str = GROUP,
    ) -> None:
        self.redis, self.dataset, self.name = redis, dataset, name
        self.batch, self.claim_idle_ms, self.stream, self.group = batch, claim_idle_ms, stream, group
        self.stored = 0  # events new to the dataset, since start
        self.refused = 0  # batches the dataset refused (and that stayed pending to be stored again), since start

    def ensure_group(self) -> None:
        try:
            # From id 0: events appended before the learner ever ran belong to it too.
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def recover(self) -> int:
        """Steps 1 and 2: own pending entries, then those of dead consumers. Returns events handled."""
        handled = 0
        while True:
            reply = self.redis.xreadgroup(self.group, self.name, {self.stream: "0"}, count=self.batch)
            entries = _first_stream(reply)
            if not entries:
                break
            handled += self._store(entries)
        return handled + self.claim_dead()

    def claim_dead(self) -> int:
        """Step 2: store the entries other consumers left pending longer than `claim_idle_ms`."""
        handled = 0
        cursor = "0-0"
        while True:
            raw = self.redis.xautoclaim(
                self.stream, self.group, self.name, self.claim_idle_ms, start_id=cursor, count=self.batch
            )
            claimed = split_autoclaim(raw)
            if claimed.deleted:
                log.error("events %s were deleted before they were stored; they are lost", claimed.deleted)
            if claimed.entries:
                handled += self._store(claimed.entries)
            cursor = claimed.cursor
            if cursor == "0-0":
                return handled

    def poll(self, block_ms: int | None = None) -> int:
        """Step 3: store one batch of new events (waiting up to `block_ms` for some). Returns events handled."""
        reply = self.redis.xreadgroup(self.group, self.name, {self.stream: ">"}, count=self.batch, block=block_ms)
        entries = _first_stream(reply)
        return self._store(entries) if entries else 0

    def drain(self) -> int:
        """Recover, then store new events until none is left; for commands and tests."""
        self.ensure_group()
        handled = self.recover()
        while (n := self.poll()) > 0:
            handled += n
        self.trim()
        return handled

    def run(
        self,
        stop: threading.Event,
        block_ms: int = 1000,
        on_batch: Callable[[int], None] | None = None,
        reclaim_s: float = RECLAIM_S,
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> None:
        """Consume until `stop` is set: recover first, then follow the stream, claiming dead consumers' entries
        every `reclaim_s`; ride out Redis outages and a dataset that refuses writes."""
        wait = backoff_s[0]
        while not stop.is_set():
            try:
                self.ensure_group()
                self.recover()
                wait = backoff_s[0]  # a full recovery stored everything pending: the dataset writes again
                self._follow(stop, block_ms, on_batch, reclaim_s)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # Whatever was read and not acknowledged stays pending and is recovered on reconnection.
                log.warning("Redis unavailable (%s); retrying in %.0f s", exc, RECONNECT_S)
                stop.wait(RECONNECT_S)
            except ResponseError as exc:
                if not group_gone(exc):
                    raise
                # Redis restarted empty (or the stream was deleted): make the group again and go on.
                log.warning("the consumer group is gone (%s); creating it again", exc)
            except sqlite3.Error as exc:
                # Not acknowledged, so still pending: recovered (step 1) once the dataset takes writes again.
                self.refused += 1
                log.error("the dataset refused a batch (%s); it stays in Redis, retrying in %.1f s", exc, wait)
                stop.wait(wait)
                wait = min(wait * 2, backoff_s[1])

    def _follow(
        self, stop: threading.Event, block_ms: int, on_batch: Callable[[int], None] | None, reclaim_s: float
    ) -> None:
        reclaim_at = time.monotonic() + reclaim_s
        while not stop.is_set():
            n = self.poll(block_ms)
            if time.monotonic() >= reclaim_at:
                n += self.claim_dead()
                reclaim_at = time.monotonic() + reclaim_s
            if n:
                self.trim()
                if on_batch is not None:
                    on_batch(n)

    def trim(self) -> int:
        """Delete acknowledged entries: everything below the oldest pending one (or the last delivered)."""
        summary = self.redis.xpending(self.stream, self.group)
        if summary["pending"]:
            floor = as_text(summary["min"])
        else:
            groups = {as_text(g["name"]): g for g in self.redis.xinfo_groups(self.stream)}
            floor = as_text(groups[self.group]["last-delivered-id"])
        # MINID removes ids strictly below `floor`; entries not yet delivered are above it.
        return int(self.redis.xtrim(self.stream, minid=floor, approximate=False))

    def _store(self, entries: list[Entry]) -> int:
        rows = [(i, f["kind"], f["data"]) for i, f in entries if f is not None]
        gone = [i for i, f in entries if f is None]
        if gone:
            log.error("events %s were deleted before they were stored; they are lost", gone)
        self.stored += self.dataset.insert(rows) if rows else 0
        self.redis.xack(self.stream, self.group, *[i for i, _ in entries])
        return len(entries)


def _first_stream(reply: Any) -> list[Entry]:
    """XREADGROUP's RESP2 reply for one stream: [[stream, entries]], or empty when nothing came."""
    return _entries(reply[0][1]) if reply else []


def _entries(raw: list[Any]) -> list[Entry]:
    return [(as_text(i), None if f is None else {as_text(k): as_text(v) for k, v in f.items()}) for i, f in raw]
