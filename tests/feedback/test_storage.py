"""What feedback costs Redis, and what happens when Redis or the stream is full: a bounded stream that pauses
feedback (503) while the consumer is down and resumes once it caught up, an embedded Redis that never evicts and
refuses writes when full (503, nothing lost), and the warnings an operator reads."""

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis_module
from redis.asyncio import Redis

from deploy.redis_server import EmbeddedRedis, maxmemory_bytes, memory_warning
from deploy.settings import load_settings
from feedback.consumer import FeedbackConsumer
from feedback.dataset import Dataset
from feedback.status import backlog_warning
from feedback.stream import STREAM_KEY
from serve.app import create_app
from serve.fake_engine import FakeEngine
from tests.conftest import free_port

ASK = {"messages": [{"role": "user", "content": "name a colour"}], "n": 2, "max_tokens": 16}
SMALL = {"max_model_len": 256, "max_tokens_limit": 128, "default_max_tokens": 64}


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine, redis: Redis, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings(**SMALL, **settings), engine, redis, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


async def ask(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200, response.text
    comparison_id: str = response.json()["id"]
    return comparison_id


async def rank(http: httpx.AsyncClient, comparison_id: str, user: str) -> httpx.Response:
    return await http.post("/v1/feedback", json={"comparison_id": comparison_id, "ranking": [1, 0], "user": user})


def refused_as(response: httpx.Response, code: str, retry_after: str) -> str:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == retry_after
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "server_error"
    message: str = error["message"]
    return message


async def test_feedback_pauses_at_the_backlog_bound_and_resumes_once_consumed(
    engine: FakeEngine, redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    async with serving(engine, redis, feedback_max_backlog=3) as http:
        first, second = await ask(http), await ask(http)
        assert (await rank(http, first, "ann")).status_code == 201  # the comparison, then the ranking
        accepted = await rank(http, first, "bob")
        assert accepted.status_code == 201 and await redis.xlen(STREAM_KEY) == 3  # the bound
        message = refused_as(await rank(http, second, "ann"), "feedback_backlog", "30")
        assert "3 events wait" in message and "rankloop feedback stats" in message
        demo = {"messages": [{"role": "user", "content": "hi"}], "answer": "Hello!"}
        refused_as(await http.post("/v1/demonstrations", json=demo), "feedback_backlog", "30")
        retry = await rank(http, first, "bob")  # an accepted ranking's retry still hears its id
        assert retry.status_code == 200 and retry.json() == {**accepted.json(), "duplicate": True}
        assert (
            await redis.xlen(STREAM_KEY) == 3 and await redis.hget(f"rankloop:comparison:{second}", "streamed") is None
        )

        sync = sync_redis_module.Redis.from_url(redis_server.url)
        with Dataset(tmp_path / "d.sqlite3") as dataset:
            consumer = FeedbackConsumer(sync, dataset, "me")
            assert consumer.drain() == 3
            assert (await rank(http, second, "ann")).status_code == 201  # the consumer caught up: taken again
            consumer.drain()
            assert (await http.post("/v1/demonstrations", json=demo)).status_code == 201
            consumer.drain()
            assert dataset.counts() == {"ranking": 3, "demonstration": 1} and dataset.comparison_count() == 2
        sync.close()


@pytest.fixture
def small_redis(tmp_path: Path, redis_binary: Path | None) -> Iterator[tuple[EmbeddedRedis, sync_redis_module.Redis]]:
    server = EmbeddedRedis(tmp_path / "redis", free_port(), redis_binary, maxmemory=64 * 1024**2)
    server.start()
    client = sync_redis_module.Redis.from_url(server.url)
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


def limit_to(client: sync_redis_module.Redis, share: float) -> None:
    """Set maxmemory so that what Redis uses now is `share` of it (above 1: it is full)."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", max(1, int(used / share)))


async def test_a_full_redis_refuses_answers_and_feedback_and_loses_nothing(
    engine: FakeEngine, small_redis: tuple[EmbeddedRedis, sync_redis_module.Redis]
) -> None:
    server, client = small_redis
    config = {**client.config_get("maxmemory"), **client.config_get("maxmemory-policy")}
    assert config == {"maxmemory": str(64 * 1024**2), "maxmemory-policy": "noeviction"}
    redis = Redis.from_url(server.url)
    async with serving(engine, redis) as http:
        asked = await ask(http)
        limit_to(client, 2.0)
        message = refused_as(await http.post("/v1/chat/completions", json=ASK), "redis_full", "30")
        assert "Redis is full" in message and "RANKLOOP_REDIS_MAXMEMORY" in message
        refused_as(await rank(http, asked, "ann"), "redis_full", "30")
        assert (
            await redis.xlen(STREAM_KEY) == 0 and await redis.hget(f"rankloop:comparison:{asked}", "streamed") is None
        )
        assert await redis.exists(f"rankloop:comparison:{asked}") == 1  # kept: nothing is evicted

        limit_to(client, 0.85)
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok" and "of its maxmemory" in health["warnings"][0]
        assert health["redis_memory"]["max_bytes"] == int(client.config_get("maxmemory")["maxmemory"])

        client.config_set("maxmemory", 64 * 1024**2)
        assert (await rank(http, asked, "ann")).status_code == 201  # room again: taken, once
        assert "warnings" not in (await http.get("/healthz")).json()
    await redis.aclose()


def test_the_warnings_an_operator_reads() -> None:
    info = {"used_memory": 900, "maxmemory": 1000, "maxmemory_policy": "noeviction"}
    assert "90% of its maxmemory" in (memory_warning(info) or "")
    assert memory_warning({**info, "used_memory": 800}) is None  # 80% is still fine
    assert memory_warning({**info, "maxmemory": 0}) is None  # no limit: nothing to warn of
    assert "evicts keys" in (memory_warning({**info, "used_memory": 1, "maxmemory_policy": "allkeys-lru"}) or "")
    assert backlog_warning(8000, 10_000) is None and backlog_warning(5, 0) is None
    assert "8001 entries of at most 10000" in (backlog_warning(8001, 10_000) or "")


def test_the_memory_limit_setting() -> None:
    assert [maxmemory_bytes(v) for v in ("100", "100b", "4kb", "512mb", "2gb", "2GB")] == [
        100,
        100,
        4096,
        512 * 1024**2,
        2 * 1024**3,
        2 * 1024**3,
    ]
    assert maxmemory_bytes(None) > 0
    with pytest.raises(ValueError, match="redis_maxmemory"):
        load_settings(redis_maxmemory="2 gigabytes")
