"""Each bad request gets a 4xx in OpenAI's error shape that names the field to fix."""

from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

HELLO = [{"role": "user", "content": "hello world"}]


async def _error(client: httpx.AsyncClient, body: Any, status: int = 400) -> dict[str, Any]:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({}, "messages", "Field required"),
        ({"messages": "hello"}, "messages", "valid list"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role", "Field required"),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages.0.role",
            "'system', 'user' or 'assistant'",
        ),
        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content", "valid string"),
        (
            {"messages": [{"role": "assistant", "content": "hi"}]},
            "messages",
            "last message must have role 'user'",
        ),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages", "empty"),
        ({"messages": HELLO, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": HELLO, "temperature": 0}, "temperature", "temperature 0 (greedy) makes all 4 candidates"),
        ({"messages": HELLO, "temperature": 0, "n": 2}, "temperature", "ask for n=1"),
        ({"messages": HELLO, "n": 10}, "n", "less than or equal to 9"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": HELLO, "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"messages": HELLO, "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": HELLO, "max_token": 5}, "max_token", "unknown field 'max_token'"),
    ],
)
async def test_bad_fields_are_named(client: httpx.AsyncClient, body: dict[str, Any], param: str, fragment: str) -> None:
    error = await _error(client, body)
    assert error["param"] == param
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_max_tokens_over_the_server_limit(client: httpx.AsyncClient) -> None:
    error = await _error(client, {"messages": HELLO, "max_tokens": 129})
    assert error["param"] == "max_tokens"
    assert error["message"] == "max_tokens is 129; this server allows at most 128"


async def test_max_tokens_beyond_the_context(client: httpx.AsyncClient, tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_text = "the quick brown fox " * 40  # ~160 tokens with this tokenizer: room < 128 in a 256 context
    prompt_len = len(
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": long_text}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert 128 < prompt_len < 256
    error = await _error(client, {"messages": [{"role": "user", "content": long_text}], "max_tokens": 128})
    assert error["param"] == "max_tokens"
    assert error["code"] == "context_length_exceeded"
    assert f"at most {256 - prompt_len}" in error["message"]


async def test_prompt_longer_than_the_context(client: httpx.AsyncClient) -> None:
    error = await _error(client, {"messages": [{"role": "user", "content": "the quick brown fox " * 100}]})
    assert error["param"] == "messages"
    assert error["code"] == "context_length_exceeded"


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    error = await _error(client, {"messages": HELLO, "model": "gpt-4"}, status=404)
    assert error["param"] == "model" and error["code"] == "model_not_found"


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_body_over_the_size_limit_is_413(client: httpx.AsyncClient, redis: Redis) -> None:
    body = {"messages": [{"role": "user", "content": "x" * 5000}]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "the request body is larger than 4096 bytes"
    assert await redis.dbsize() == 0


async def test_bad_requests_store_nothing(client: httpx.AsyncClient, redis: Redis) -> None:
    await _error(client, {"messages": HELLO, "n": 10})
    await _error(client, {"messages": HELLO, "max_tokens": 0})
    assert await redis.dbsize() == 0
