"""The consumer against a real Redis server: every event into the dataset once, the stream trimmed safely."""

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis

from deploy.redis_server import EmbeddedRedis
from feedback.consumer import GROUP, FeedbackConsumer, default_consumer_name, split_autoclaim
from feedback.dataset import Dataset
from feedback.status import stream_status
from feedback.stream import STREAM_KEY
from tests.feedback.helpers import append_events, demonstration_json


@pytest.fixture
def dataset(tmp_path: Path) -> Iterator[Dataset]:
    data = Dataset(tmp_path / "feedback.sqlite3")
    yield data
    data.close()


def test_autoclaim_reply_of_redis_6_and_7() -> None:
    # As redis-py hands them over: Redis 6.2 [cursor, entries]; 7.x [cursor, entries, deleted ids].
    six = split_autoclaim([b"0-0", [(b"1-0", {b"kind": b"ranking"})]])
    seven = split_autoclaim([b"5-0", [(b"1-0", {b"kind": b"ranking"})], [b"2-0"]])
    assert (six.cursor, six.entries, six.deleted) == ("0-0", [("1-0", {"kind": "ranking"})], [])
    assert (seven.cursor, seven.entries, seven.deleted) == ("5-0", [("1-0", {"kind": "ranking"})], ["2-0"])


def test_drain_stores_every_event_once_and_trims(
    redis_server: EmbeddedRedis, sync_redis: Redis, dataset: Dataset
) -> None:
    ids = append_events(redis_server.url, 25)
    consumer = FeedbackConsumer(sync_redis, dataset, "c1", batch=10)
    assert consumer.drain() == 25
    assert dataset.ids() == ids and consumer.stored == 25
    status = stream_status(sync_redis)
    assert (status.pending, status.lag) == (0, 0)
    # Trimmed below the last delivered entry, which MINID keeps.
    assert status.length == 1
    assert dataset.counts() == {"demonstration": 25}


def test_a_redelivered_batch_is_not_counted_twice(dataset: Dataset) -> None:
    rows = [("1-0", "demonstration", demonstration_json(0)), ("1-1", "demonstration", demonstration_json(1))]
    assert dataset.insert(rows) == 2
    assert dataset.insert(rows) == 0
    assert dataset.count() == 2


def test_ordering_is_numeric_not_textual(dataset: Dataset) -> None:
    dataset.insert([(i, "demonstration", demonstration_json(n)) for n, i in enumerate(["10-0", "9-5", "9-10"])])
    assert dataset.ids() == ["9-5", "9-10", "10-0"]


def test_a_dead_consumers_pending_events_are_claimed(
    redis_server: EmbeddedRedis, sync_redis: Redis, dataset: Dataset
) -> None:
    ids = append_events(redis_server.url, 12)
    FeedbackConsumer(sync_redis, dataset, "dead").ensure_group()
    sync_redis.xreadgroup(GROUP, "dead", {STREAM_KEY: ">"}, count=5)  # delivered, never stored: it died
    assert stream_status(sync_redis).pending == 5
    patient = FeedbackConsumer(sync_redis, dataset, "patient", claim_idle_ms=3_600_000)
    assert patient.drain() == 7  # too recent to claim: only the 7 never delivered
    assert stream_status(sync_redis).pending == 5
    assert sync_redis.xlen(STREAM_KEY) >= 5  # trimming kept everything from the oldest pending entry on
    heir = FeedbackConsumer(sync_redis, dataset, "heir", claim_idle_ms=0)
    assert heir.drain() == 5
    assert dataset.ids() == ids
    assert stream_status(sync_redis).pending == 0


def test_own_pending_events_come_first_after_a_restart(
    redis_server: EmbeddedRedis, sync_redis: Redis, dataset: Dataset
) -> None:
    ids = append_events(redis_server.url, 6)
    FeedbackConsumer(sync_redis, dataset, "me").ensure_group()
    sync_redis.xreadgroup(GROUP, "me", {STREAM_KEY: ">"}, count=4)
    restarted = FeedbackConsumer(sync_redis, dataset, "me", claim_idle_ms=3_600_000)
    assert restarted.recover() == 4  # its own pending entries, however recent
    assert dataset.ids() == ids[:4]


def test_status_counts_lag_and_pending(redis_server: EmbeddedRedis, sync_redis: Redis, dataset: Dataset) -> None:
    append_events(redis_server.url, 9)
    assert stream_status(sync_redis).group_exists is False
    FeedbackConsumer(sync_redis, dataset, "x").ensure_group()
    sync_redis.xreadgroup(GROUP, "x", {STREAM_KEY: ">"}, count=3)
    status = stream_status(sync_redis)
    assert (status.length, status.pending, status.lag, status.consumers) == (9, 3, 6, 1)


def test_run_follows_new_events_until_stopped(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    stop = threading.Event()
    batches: list[int] = []
    path = tmp_path / "followed.sqlite3"

    def follow() -> None:
        with Dataset(path) as own:  # SQLite connections belong to the thread that made them
            FeedbackConsumer(Redis.from_url(redis_server.url), own, "follower").run(stop, 100, batches.append)

    Redis.from_url(redis_server.url).flushdb()
    thread = threading.Thread(target=follow)
    thread.start()
    try:
        ids = append_events(redis_server.url, 7) + append_events(redis_server.url, 5, start=7)
        deadline = time.monotonic() + 10
        while sum(batches) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    with Dataset(path) as seen:
        assert seen.ids() == ids


def until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def stored_ids(path: Path) -> list[str]:
    with Dataset(path) as seen:
        return seen.ids()


def test_a_dataset_that_refuses_writes_stops_nothing_and_loses_nothing(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    Redis.from_url(redis_server.url).flushdb()
    path = tmp_path / "locked.sqlite3"
    Dataset(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the dataset: every write the consumer tries fails
    stop, consumers = threading.Event(), []

    def follow() -> None:
        with Dataset(path, busy_ms=100) as own:
            consumer = FeedbackConsumer(Redis.from_url(redis_server.url), own, "patient")
            consumers.append(consumer)
            consumer.run(stop, 100, backoff_s=(0.2, 0.4))

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        ids = append_events(redis_server.url, 12)
        assert until(lambda: bool(consumers) and consumers[0].refused >= 2)
        assert thread.is_alive()
        status = stream_status(Redis.from_url(redis_server.url))
        assert status.pending >= 1 and status.pending + status.lag == 12  # read and refused, or not yet read
        assert stored_ids(path) == []
        holder.execute("ROLLBACK")
        assert until(lambda: len(stored_ids(path)) == 12)
        assert thread.is_alive()
    finally:
        holder.close()
        stop.set()
        thread.join(timeout=5)
    assert stored_ids(path) == ids  # each once, in order
    assert stream_status(Redis.from_url(redis_server.url)).pending == 0


def test_a_running_consumer_claims_what_a_consumer_that_died_after_its_start_left(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    path = tmp_path / "heir.sqlite3"
    ids = append_events(redis_server.url, 6)
    FeedbackConsumer(redis, Dataset(tmp_path / "unused.sqlite3"), "dead").ensure_group()
    redis.xreadgroup(GROUP, "dead", {STREAM_KEY: ">"}, count=6)  # read, then the consumer dies: never acknowledged
    stop = threading.Event()

    def follow() -> None:
        with Dataset(path) as own:  # too young to claim at start (idle < 1 s): only the periodic look finds them
            FeedbackConsumer(Redis.from_url(redis_server.url), own, "heir", claim_idle_ms=1000).run(
                stop, 100, reclaim_s=0.3
            )

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        assert until(lambda: len(stored_ids(path)) == 6)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert stored_ids(path) == ids
    assert stream_status(redis).pending == 0


def test_the_default_consumer_name_is_the_same_on_every_restart_of_one_dataset(tmp_path: Path) -> None:
    here, there = tmp_path / "a" / "feedback.sqlite3", tmp_path / "b" / "feedback.sqlite3"
    assert default_consumer_name(here) == default_consumer_name(tmp_path / "a" / ".." / "a" / "feedback.sqlite3")
    assert default_consumer_name(here) != default_consumer_name(there)


def test_a_running_consumer_goes_on_after_redis_lost_its_group(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    path = tmp_path / "again.sqlite3"
    stop = threading.Event()

    def follow() -> None:
        with Dataset(path) as own:
            FeedbackConsumer(Redis.from_url(redis_server.url), own, "steady").run(stop, 100)

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        first = append_events(redis_server.url, 3)
        assert until(lambda: len(stored_ids(path)) == 3)
        redis.flushdb()  # as a Redis without persistence, restarted: the stream and the group are gone
        later = append_events(redis_server.url, 4, start=3)
        assert until(lambda: len(stored_ids(path)) == 7)
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=5)
    assert stored_ids(path) == first + later
