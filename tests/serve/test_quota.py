"""Quotas (deploy.quota) per key and per client address, and the cap on rankings per comparison: 429 with
Retry-After (409 for a full comparison) and nothing recorded, over the fake engine and a real Redis."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis as sync_redis_module
from redis.asyncio import Redis

from deploy.keys import KeyStore
from deploy.quota import Limit, Quotas
from deploy.redis_server import EmbeddedRedis
from deploy.settings import load_settings
from feedback.stream import STREAM_KEY
from serve.app import create_app
from serve.fake_engine import FakeEngine

ASK = {"messages": [{"role": "user", "content": "hello world"}], "n": 2, "max_tokens": 16, "temperature": 0.7}
SMALL = {"max_model_len": 256, "max_tokens_limit": 128, "default_max_tokens": 64}
ELSEWHERE = ("10.0.0.5", 40000)  # a client address that is not this machine's


@contextlib.asynccontextmanager
async def serving(
    engine: FakeEngine, redis: Redis, client: tuple[str, int] = ("127.0.0.1", 123), **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings(**SMALL, **settings), engine, redis, "v0001")
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def _over(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 60
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded") and "retry in" in error["message"]


async def _ask(http: httpx.AsyncClient, headers: dict[str, str] | None = None) -> str:
    response = await http.post("/v1/chat/completions", json=ASK, headers=headers)
    assert response.status_code == 200, response.text
    comparison_id: str = response.json()["id"]
    return comparison_id


async def test_a_keys_rankings_are_counted_and_the_one_over_is_not_stored(
    engine: FakeEngine, redis: Redis, redis_server: EmbeddedRedis
) -> None:
    key = KeyStore(sync_redis_module.Redis.from_url(redis_server.url)).create("ann", "rater")
    headers = {"Authorization": f"Bearer {key}"}
    async with serving(engine, redis, auth="keys", redis_url=redis_server.url, quota_rankings_per_minute=2) as http:
        asked = [await _ask(http, headers) for _ in range(3)]
        for comparison_id in asked[:2]:
            body = {"comparison_id": comparison_id, "ranking": [0, 1]}
            assert (await http.post("/v1/feedback", json=body, headers=headers)).status_code == 201
        _over(await http.post("/v1/feedback", json={"comparison_id": asked[2], "ranking": [0, 1]}, headers=headers))
    assert await redis.xlen(STREAM_KEY) == 4  # two rankings, each after its comparison


async def test_an_address_is_counted_and_this_machine_is_not(engine: FakeEngine, redis: Redis) -> None:
    async with serving(engine, redis, client=ELSEWHERE, quota_chat_per_minute=1) as http:
        await _ask(http)
        _over(await http.post("/v1/chat/completions", json=ASK))
    async with serving(engine, redis, quota_chat_per_minute=1) as http:  # loopback: `make run`, simulate, benches
        for _ in range(3):
            await _ask(http)
    assert len(engine.requests) == 4  # the refused request never reached the engine


async def test_generated_tokens_are_charged_once_written(engine: FakeEngine, redis: Redis) -> None:
    async with serving(engine, redis, client=ELSEWHERE, quota_tokens_per_minute=20) as http:
        first = (await http.post("/v1/chat/completions", json={**ASK, "n": 4})).json()
        assert first["usage"]["completion_tokens"] > 20  # the answer is written whole, then charged: into debt
        _over(await http.post("/v1/chat/completions", json=ASK))
    assert len(engine.requests) == 1


async def test_demonstrations_have_their_own_quota(engine: FakeEngine, redis: Redis) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "answer": "Hello!"}
    async with serving(engine, redis, client=ELSEWHERE, quota_demonstrations_per_minute=1) as http:
        assert (await http.post("/v1/demonstrations", json=body)).status_code == 201
        _over(await http.post("/v1/demonstrations", json={**body, "answer": "Hi there!"}))
        assert (await http.post("/v1/chat/completions", json=ASK)).status_code == 200  # other quotas untouched
    assert await redis.xlen(STREAM_KEY) == 1


async def test_a_comparison_takes_a_capped_number_of_rankings(engine: FakeEngine, redis: Redis) -> None:
    async with serving(engine, redis, max_rankings_per_comparison=2) as http:
        asked = await _ask(http)
        sent = [
            await http.post("/v1/feedback", json={"comparison_id": asked, "ranking": [0, 1], "user": user})
            for user in ("a", "b", "c", "a")
        ]
    assert [r.status_code for r in sent] == [201, 201, 409, 200]  # the last: a's retry, recognised as before
    assert sent[2].json()["error"]["code"] == "comparison_full"
    assert await redis.xlen(STREAM_KEY) == 3  # the comparison once, two rankings


async def test_a_bucket_refills_at_its_rate(redis: Redis) -> None:
    quotas = Quotas(redis, load_settings(**SMALL))
    quotas.limits["ranking"] = Limit(60)  # one a second, sixty at most
    await quotas.take(["key:x"], {"ranking": 60})
    with pytest.raises(Exception, match="retry in 1 s") as refused:
        await quotas.take(["key:x"], {"ranking": 1})
    assert getattr(refused.value, "headers", None) == {"Retry-After": "1"}
    await quotas.take(["key:y"], {"ranking": 1})  # another holder's bucket is its own
    await asyncio.sleep(1.1)
    await quotas.take(["key:x"], {"ranking": 1})


async def test_a_client_that_leaves_mid_stream_is_charged_what_was_generated(tokenizer: Any, redis: Redis) -> None:
    from api.metrics import ServeMetrics
    from api.protocol import ChatCompletionRequest
    from feedback.comparisons import ComparisonStore
    from serve.chat import Caller, ChatService
    from serve.swap import ServedVersion

    engine = FakeEngine(tokenizer, step_s=0.05)
    service = ChatService(
        engine, ComparisonStore(redis, 60), load_settings(**SMALL), ServeMetrics(), ServedVersion("v0001")
    )
    charged: list[int] = []

    async def charge(tokens: int) -> None:
        charged.append(tokens)

    request = ChatCompletionRequest.model_validate({**ASK, "stream": True})
    body = await service.stream(request, Caller("ann", None, charge))
    chunks = [await anext(body) for _ in range(2 + 2 * 3)]  # the role chunks, then 3 engine steps of 2 choices
    assert len(chunks) == 8
    await body.aclose()  # the client left
    await asyncio.sleep(0.1)
    whole = 2 * len(engine.answer(0, engine.requests[0]))
    # Once, for the tokens generated when it left: at least the 3 steps read, fewer than the whole answers.
    assert len(charged) == 1 and 6 <= charged[0] < whole and charged[0] % 2 == 0, (charged, whole)
