"""Faults against real processes: consumers and the Redis server killed with SIGKILL; nothing lost or doubled."""

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

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
def test_redis_killed_and_restarted_keeps_stream_pending_and_claims(tmp_path: Path, redis_binary: Path | None) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port(), executable=redis_binary)
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


@pytest.mark.timeout(60)
async def test_a_redis_that_stops_answering_fails_requests_in_time_and_counts_nothing_twice(
    tmp_path: Path, tokenizer: Any, redis_binary: Path | None
) -> None:
    import os
    import signal
    import time

    import httpx

    from deploy.redis_clients import async_redis
    from deploy.settings import load_settings
    from serve.app import create_app
    from serve.fake_engine import FakeEngine
    from serve.swap import ServedVersion

    server = EmbeddedRedis(tmp_path / "redis", free_port(), executable=redis_binary)
    server.start()
    settings = load_settings(redis_url=server.url, redis_timeout_s=2.0, data_dir=tmp_path)
    redis = async_redis(settings)
    app = create_app(settings, FakeEngine(tokenizer), redis, ServedVersion("v0001"))
    ask = {"messages": [{"role": "user", "content": "name a colour"}], "max_tokens": 8, "n": 2}
    assert server.process is not None
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            served = (await client.post("/v1/chat/completions", json=ask)).json()
            ranking = {"comparison_id": served["id"], "ranking": [1, 0], "user": "ann"}
            os.kill(server.process.pid, signal.SIGSTOP)  # alive, connected, and answering nothing
            try:
                for path, body in (("/v1/chat/completions", ask), ("/v1/feedback", ranking)):
                    started = time.monotonic()
                    response = await client.post(path, json=body)
                    took = time.monotonic() - started
                    assert response.status_code == 503 and took < 5.0, (path, response.status_code, took)
                    assert response.headers["retry-after"]
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            # The timed-out append may have run once Redis woke: the client's retry is recognised either way.
            again = await client.post("/v1/feedback", json=ranking)
            assert again.status_code in (200, 201), again.text  # 200: a duplicate of the append that ran late
            assert again.json()["duplicate"] == (again.status_code == 200)
            events = await redis.xrange(STREAM_KEY)
            assert [e[1][b"kind"] for e in events] == [b"comparison", b"ranking"]  # one ranking, not two
    finally:
        await redis.aclose()
        server.kill()
