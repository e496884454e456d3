"""Faults against real processes: consumers and the Redis server killed with SIGKILL; nothing lost or doubled."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from deploy.redis_server import EmbeddedRedis
from feedback.consumer import GROUP, FeedbackConsumer
from feedback.dataset import Dataset
from feedback.status import stream_status
from feedback.stream import STREAM_KEY, FeedbackStream
from tests.conftest import free_port
from tests.feedback.helpers import append_events

REPO = Path(__file__).resolve().parents[2]


def crash(url: str, dataset: Path, name: str, point: str, batch: int) -> None:
    argv = [sys.executable, "-m", "tests.feedback.crashing_consumer", url, str(dataset), name, point, str(batch)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr  # killed by its own SIGKILL at the crash point, not before


def test_consumers_killed_twice_mid_batch_lose_and_double_nothing(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    redis = Redis.from_url(redis_server.url)
    redis.flushdb()
    path = tmp_path / "feedback.sqlite3"
    accepted = append_events(redis_server.url, 95)
    crash(redis_server.url, path, "first", "mid-insert", batch=3)  # 2 batches of 10 stored, the third half-written
    with Dataset(path) as seen:
        assert seen.count() == 20  # the uncommitted half of batch 3 rolled back
    crash(redis_server.url, path, "second", "before-ack", batch=2)  # claims first's 10, stores them, dies unacked
    with Dataset(path) as seen:
        assert seen.count() == 40
    assert stream_status(redis).pending > 0
    with Dataset(path) as dataset:
        FeedbackConsumer(redis, dataset, "third", batch=10, claim_idle_ms=0).drain()
        assert dataset.ids() == accepted  # every accepted event, once, in order
    assert stream_status(redis).pending == 0
    redis.close()


@pytest.mark.timeout(60)
def test_redis_killed_and_restarted_keeps_stream_pending_and_claims(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port())
    server.start()
    try:
        accepted = append_events(server.url, 10)
        redis = Redis.from_url(server.url)
        FeedbackConsumer(redis, Dataset(tmp_path / "d.sqlite3"), "c").ensure_group()
        redis.xreadgroup(GROUP, "c", {STREAM_KEY: ">"}, count=4)
        redis.close()
        server.kill()  # SIGKILL: no chance to flush anything it had not written already
        server.start()
        redis = Redis.from_url(server.url)
        assert [i.decode() for i, _ in redis.xrange(STREAM_KEY)] == accepted
        assert stream_status(redis).pending == 4
        retried = asyncio.run(_append_again(server.url, 3))
        assert (retried.outcome, retried.event_id) == ("duplicate", accepted[3])
        assert redis.xlen(STREAM_KEY) == 10
        redis.close()
    finally:
        server.stop()


async def _append_again(url: str, i: int):  # type: ignore[no-untyped-def]
    client = AsyncRedis.from_url(url)
    stream = FeedbackStream(client)
    try:
        return await stream.append("demonstration", "{}", f"fp{i}", [stream.claim_key("t", str(i))], 600)
    finally:
        await client.aclose()
