"""Response shapes, stored comparisons and streaming, over the fake engine and a real Redis server."""

import asyncio
import json
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from api.metrics import ServeMetrics
from api.protocol import ChatCompletionRequest
from deploy.settings import load_settings
from feedback.comparisons import ComparisonStore
from serve.chat import ChatService
from serve.fake_engine import FakeEngine
from serve.swap import ServedVersion

ASK = {
    "messages": [{"role": "user", "content": "hello world"}],
    "max_tokens": 32,
    "temperature": 0.7,
    "seed": 5,
}


async def test_response_has_the_openai_shape_plus_policy_version(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "policy_version"}
    assert body["object"] == "chat.completion" and body["model"] == "rankloop"
    assert body["policy_version"] == "v0001"
    assert body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # default n from settings: 4
    assert body["choices"][2] == {
        "index": 2,
        "message": {"role": "assistant", "content": "answer 2: you said hello world"},
        "finish_reason": "stop",
        "logprobs": None,
        "policy_version": None,  # each choice's writer, shown only where the operator turns versions on
    }


async def test_comparison_is_stored_with_exact_fields(
    client: httpx.AsyncClient, redis: Redis, engine: FakeEngine, tokenizer: Any
) -> None:
    body = (await client.post("/v1/chat/completions", json={**ASK, "n": 3})).json()
    key = f"rankloop:comparison:{body['id']}"
    assert await redis.keys("rankloop:comparison:*") == [key.encode()]
    ttl = await redis.ttl(key)
    assert 7 * 24 * 3600 - 5 <= ttl <= 7 * 24 * 3600
    stored = json.loads(await redis.hget(key, "json"))
    assert set(stored) == {
        "id",
        "messages",
        "prompt_token_ids",
        "candidates",
        "policy_version",
        "created",
        "sampling",
        "asker",
    }
    assert stored["asker"] is None  # RANKLOOP_AUTH=open: nobody is named
    assert stored["id"] == body["id"]
    assert stored["messages"] == [{"role": "user", "content": "hello world"}]
    assert stored["prompt_token_ids"] == engine.requests[0].prompt_token_ids
    assert stored["policy_version"] == "v0001"
    assert stored["sampling"] == {
        "temperature": 0.7,
        "top_p": 1.0,
        "max_tokens": 32,
        "seed": 5,
        "n": 3,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "json": False,
    }
    for candidate, choice in zip(stored["candidates"], body["choices"], strict=True):
        assert candidate["index"] == choice["index"]
        assert candidate["text"] == choice["message"]["content"]
        assert tokenizer.decode(candidate["token_ids"]) == candidate["text"]
        assert candidate["logprobs"] == [-0.5] * len(candidate["token_ids"])
        assert candidate["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in stored["candidates"])


async def test_a_single_answer_is_not_a_comparison(client: httpx.AsyncClient, redis: Redis) -> None:
    response = await client.post("/v1/chat/completions", json={**ASK, "n": 1})
    assert response.status_code == 200 and len(response.json()["choices"]) == 1
    assert await redis.dbsize() == 0


async def test_length_limit_sets_finish_reason(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json={**ASK, "n": 2, "max_tokens": 2})).json()
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 4


def _events(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_stream_carries_every_choice_and_matches_the_stored_comparison(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    body = {**ASK, "n": 3, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = _events(response.text)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
        if choice.get("finish_reason"):
            finished[choice["index"]] = choice["finish_reason"]
    assert texts == {i: f"answer {i}: you said hello world" for i in range(3)}
    assert finished == {0: "stop", 1: "stop", 2: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    stored = json.loads(await redis.hget(f"rankloop:comparison:{chunks[0]['id']}", "json"))
    assert [c["text"] for c in stored["candidates"]] == [texts[i] for i in range(3)]


async def test_redis_down_is_503_with_retry_after(engine: FakeEngine) -> None:
    dead = Redis(port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    settings = load_settings()
    from serve.app import create_app

    app = create_app(settings, engine, dead, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        response = await http.post("/v1/chat/completions", json=ASK)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "redis_unavailable"
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {
            "status": "degraded",
            "engine": "ok",
            "redis": "down",
            "policy_version": "v0001",
            "epoch": 0,
            "swap_error": None,
        }


async def test_client_leaving_mid_stream_aborts_the_generation(tokenizer: Any, redis: Redis) -> None:
    engine = FakeEngine(tokenizer, step_s=0.05)
    service = ChatService(engine, ComparisonStore(redis, 60), load_settings(), ServeMetrics(), ServedVersion("v0001"))
    request = ChatCompletionRequest.model_validate({**ASK, "n": 2, "stream": True})
    body = await service.stream(request)
    first = [await anext(body) for _ in range(3)]  # role chunks, then the first token
    assert len(first) == 3
    await body.aclose()  # what the server does when the client disconnects
    await asyncio.sleep(0)
    request_id = engine.requests[0].request_id
    assert request_id in engine.aborted
    assert await redis.dbsize() == 0  # an abandoned comparison is not stored


async def test_models_healthz_and_metrics(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["policy_version"]) for m in models["data"]] == [("rankloop", "v0001")]
    health = (await client.get("/healthz")).json()
    memory = health.pop("redis_memory")
    assert health == {
        "status": "ok",
        "engine": "ok",
        "redis": "ok",
        "policy_version": "v0001",
        "epoch": 0,
        "swap_error": None,
    }
    # The shared test server runs with a quarter of this machine's memory as its limit, and uses little of it.
    assert 0 < memory["used_bytes"] < 0.8 * memory["max_bytes"]
    await client.post("/v1/chat/completions", json={**ASK, "n": 2})
    await client.post("/v1/chat/completions", json={**ASK, "n": 10})
    text = (await client.get("/metrics")).text
    assert 'rankloop_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'rankloop_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert "rankloop_comparisons_stored_total 1.0" in text
    assert "rankloop_engine_unfinished_requests 0.0" in text
    assert 'rankloop_request_latency_seconds_count{route="chat"} 1.0' in text


async def test_unknown_route_is_a_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("content", [[{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]])
async def test_content_parts_are_joined(client: httpx.AsyncClient, content: list[dict[str, str]]) -> None:
    body = (
        await client.post("/v1/chat/completions", json={**ASK, "messages": [{"role": "user", "content": content}]})
    ).json()
    assert body["choices"][0]["message"]["content"] == "answer 0: you said hello world"
