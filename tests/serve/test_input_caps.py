"""Caps on what a request may hold: each is a 400 that names the field and the cap, before any work, and stores
nothing. Bodies here are sent as raw JSON text so that escapes such as a lone surrogate reach the server as a
client would send them."""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from api.protocol import MAX_CONTENT_CHARS, MAX_MESSAGES
from deploy.settings import load_settings
from feedback.models import MAX_ANSWER_CHARS
from serve.app import create_app
from serve.fake_engine import FakeEngine

HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture
async def roomy(engine: FakeEngine, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """A server whose body limit is above the caps, so that the caps (not the 413) are what refuses."""
    settings = load_settings(max_model_len=256, max_tokens_limit=128, default_max_tokens=64, max_body_bytes=4_000_000)
    app = create_app(settings, engine, redis, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


async def _post(client: httpx.AsyncClient, path: str, raw: str) -> httpx.Response:
    return await client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


async def _refused(client: httpx.AsyncClient, path: str, body: Any, param: str | None, fragment: str) -> None:
    response = await _post(client, path, body if isinstance(body, str) else json.dumps(body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert fragment in error["message"], error


@pytest.mark.parametrize(
    ("stop", "param", "fragment"),
    [
        ("", "stop", "empty"),
        ([""], "stop", "empty"),
        (["a", "b", "c", "d", "e"], "stop", "at most 4"),
        ("x" * 65, "stop", "has 65 characters; each may have at most 64"),
        (["ok", "y" * 65], "stop", "has 65 characters; each may have at most 64"),
    ],
)
async def test_stop_sequences_are_capped(client: httpx.AsyncClient, stop: Any, param: str, fragment: str) -> None:
    await _refused(client, "/v1/chat/completions", {"messages": HELLO, "stop": stop}, param, fragment)


async def test_four_stop_sequences_of_64_characters_are_accepted(client: httpx.AsyncClient) -> None:
    body = {"messages": HELLO, "stop": ["a" * 64, "b", "c", "d"], "max_tokens": 4}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


async def test_too_many_messages(roomy: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    await _refused(roomy, "/v1/chat/completions", {"messages": messages}, "messages", f"at most {MAX_MESSAGES}")


async def test_a_message_over_the_content_cap(roomy: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}]
    await _refused(
        roomy, "/v1/chat/completions", {"messages": messages}, "messages.0.content", f"at most {MAX_CONTENT_CHARS}"
    )


async def test_text_parts_count_together_against_the_content_cap(roomy: httpx.AsyncClient) -> None:
    half = "x" * (MAX_CONTENT_CHARS // 2 + 1)
    parts = [{"type": "text", "text": half}, {"type": "text", "text": half}]
    await _refused(
        roomy,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": parts}]},
        "messages.0.content",
        f"at most {MAX_CONTENT_CHARS}",
    )


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "messages.0.content"),
        ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "messages.0.content"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud83d"}', "stop"),
        ('{"messages": [{"role": "user", "content": "hi"}], "user": "\\udc00"}', "user"),
    ],
)
async def test_lone_surrogates_are_400(client: httpx.AsyncClient, redis: Redis, raw: str, param: str) -> None:
    await _refused(client, "/v1/chat/completions", raw, param, "lone surrogate")
    assert await redis.dbsize() == 0


async def test_a_surrogate_pair_is_text(client: httpx.AsyncClient) -> None:
    # "\ud83d\ude00" is one character (an emoji) written as a JSON surrogate pair: valid.
    raw = '{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}], "max_tokens": 4}'
    response = await _post(client, "/v1/chat/completions", raw)
    assert response.status_code == 200, response.text


async def test_a_demonstration_answer_over_the_cap(roomy: httpx.AsyncClient, redis: Redis) -> None:
    body = {"messages": HELLO, "answer": "x" * (MAX_ANSWER_CHARS + 1)}
    await _refused(roomy, "/v1/demonstrations", body, "answer", f"at most {MAX_ANSWER_CHARS}")
    assert await redis.dbsize() == 0


async def test_a_demonstration_with_a_lone_surrogate(client: httpx.AsyncClient, redis: Redis) -> None:
    # The feedback routes parse JSON strictly (pydantic's parser), which refuses the escape itself.
    raw = '{"messages": [{"role": "user", "content": "hi"}], "answer": "ok \\ud800"}'
    await _refused(client, "/v1/demonstrations", raw, None, "a lone surrogate")
    assert await redis.dbsize() == 0


async def test_a_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient, redis: Redis) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the server must count as it reads
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    response = await client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert await redis.dbsize() == 0
