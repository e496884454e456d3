"""POST /v1/feedback and /v1/demonstrations over the fake engine and a real Redis server."""

import asyncio
import json
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.settings import load_settings
from feedback.events import ComparisonEvent, RankingRecord
from serve.app import create_app
from serve.fake_engine import FakeEngine

STREAM = "rankloop:feedback"
ASK = {"messages": [{"role": "user", "content": "name a colour"}], "max_tokens": 16, "n": 4}


async def comparison(client: httpx.AsyncClient, n: int = 4) -> dict[str, Any]:
    response = await client.post("/v1/chat/completions", json={**ASK, "n": n})
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def kinds(redis: Redis) -> list[str]:
    """The kinds of the stream's entries, in order: a comparison's first ranking streams the comparison before it."""
    return [e["kind"] for e in await stream_events(redis)]


async def stream_events(redis: Redis) -> list[dict[str, Any]]:
    return [
        {"id": i.decode(), "kind": f[b"kind"].decode(), **json.loads(f[b"data"])} for i, f in await redis.xrange(STREAM)
    ]


async def test_a_ranking_streams_its_comparison_once_and_then_names_it(client: httpx.AsyncClient, redis: Redis) -> None:
    served = await comparison(client)
    response = await client.post(
        "/v1/feedback", json={"comparison_id": served["id"], "ranking": [[2], [0, 3], 1], "user": "ann"}
    )
    assert response.status_code == 201
    body = response.json()
    # 2 beats 0 and 3 (2 pairs), 0 and 3 tie (none), both beat 1 (2), 2 beats 1 (1): 5 pairs.
    assert body == {"id": body["id"], "duplicate": False, "kind": "ranking", "comparison_id": served["id"], "pairs": 5}
    second = await client.post("/v1/feedback", json={"comparison_id": served["id"], "ranking": [1, 0], "user": "bo"})
    assert second.status_code == 201
    entry, event, other = await stream_events(redis)
    # The comparison travels whole, once, before its first ranking: prompt, texts, token ids, logprobs, version.
    assert entry["kind"] == "comparison" and entry["id"] < event["id"]
    assert entry["comparison"] == json.loads(await redis.hget(f"rankloop:comparison:{served['id']}", "json"))
    assert entry["comparison"]["messages"] == ASK["messages"] and entry["comparison"]["policy_version"] == "v0001"
    texts = [c["text"] for c in entry["comparison"]["candidates"]]
    assert texts == [c["message"]["content"] for c in served["choices"]]
    assert await redis.hget(f"rankloop:comparison:{served['id']}", "streamed") == entry["id"].encode()
    # Each ranking names it.
    assert set(event) == {"id", "kind", "schema_version", "ranking", "user", "created", "comparison_id"}
    assert event["id"] == body["id"] and event["kind"] == "ranking" and event["schema_version"] == 2
    assert event["ranking"] == [[2], [0, 3], [1]] and event["user"] == "ann" and event["comparison_id"] == served["id"]
    assert other["ranking"] == [[1], [0]] and other["user"] == "bo" and other["comparison_id"] == served["id"]
    RankingRecord.model_validate(event, strict=False)  # the dataset's model of it reads it back
    ComparisonEvent.model_validate(entry, strict=False)


async def test_a_retry_returns_the_original_event(client: httpx.AsyncClient, redis: Redis) -> None:
    served = await comparison(client)
    ranking = {"comparison_id": served["id"], "ranking": [3, 1, 0, 2], "user": "bob"}
    first = await client.post("/v1/feedback", json=ranking)
    again = await client.post("/v1/feedback", json={**ranking, "ranking": [3, 1, [0], 2]})  # same order, other form
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}
    assert await kinds(redis) == ["comparison", "ranking"]


async def test_ranking_again_differently_is_a_conflict(client: httpx.AsyncClient, redis: Redis) -> None:
    served = await comparison(client)
    first = await client.post("/v1/feedback", json={"comparison_id": served["id"], "ranking": [0, 1], "user": "c"})
    other = await client.post("/v1/feedback", json={"comparison_id": served["id"], "ranking": [1, 0], "user": "c"})
    assert other.status_code == 409
    error = other.json()["error"]
    assert error["code"] == "already_ranked" and first.json()["id"] in error["message"]
    assert await kinds(redis) == ["comparison", "ranking"]
    # Another user may rank the same comparison.
    third = await client.post("/v1/feedback", json={"comparison_id": served["id"], "ranking": [1, 0], "user": "d"})
    assert third.status_code == 201 and await kinds(redis) == ["comparison", "ranking", "ranking"]


async def test_an_idempotency_key_reused_for_another_body_is_refused(client: httpx.AsyncClient, redis: Redis) -> None:
    a, b = await comparison(client), await comparison(client)
    sent = await client.post(
        "/v1/feedback", json={"comparison_id": a["id"], "ranking": [0, 1], "idempotency_key": "k1"}
    )
    again = await client.post(
        "/v1/feedback", json={"comparison_id": a["id"], "ranking": [0, 1], "idempotency_key": "k1"}
    )
    reused = await client.post(
        "/v1/feedback", json={"comparison_id": b["id"], "ranking": [0, 1], "idempotency_key": "k1"}
    )
    assert sent.status_code == 201 and again.status_code == 200 and again.json()["id"] == sent.json()["id"]
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert reused.json()["error"]["param"] == "idempotency_key"
    assert await kinds(redis) == ["comparison", "ranking"]


@pytest.mark.parametrize("key", [None, "retry-7"])
async def test_concurrent_duplicates_make_exactly_one_event(
    client: httpx.AsyncClient, redis: Redis, key: str | None
) -> None:
    served = await comparison(client)
    ranking = {"comparison_id": served["id"], "ranking": [2, 0, 1, 3], "user": "eve", "idempotency_key": key}
    responses = await asyncio.gather(*(client.post("/v1/feedback", json=ranking) for _ in range(40)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 39 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await kinds(redis) == ["comparison", "ranking"]


async def test_bad_rankings_are_refused_by_name_and_nothing_is_written(client: httpx.AsyncClient, redis: Redis) -> None:
    cid = (await comparison(client, n=3))["id"]
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"comparison_id": "chatcmpl-nope", "ranking": [0, 1]}, 404, "comparison_id", "unknown or has expired"),
        ({"comparison_id": cid, "ranking": [0, 3]}, 400, "ranking", "candidate index 3 is out of range"),
        ({"comparison_id": cid, "ranking": [1, [2, 1]]}, 400, "ranking", "appears more than once"),
        ({"comparison_id": cid, "ranking": [1]}, 400, "ranking", "rank at least 2 candidates"),
        ({"comparison_id": cid, "ranking": []}, 400, "ranking", "at least 1 item"),
        ({"comparison_id": cid, "ranking": ["0", 1]}, 400, "ranking", 'entry 0 holds "0"; a ranking lists'),
        ({"comparison_id": cid, "ranking": [1, [True]]}, 400, "ranking", "entry 1 holds true"),
        ({"comparison_id": cid, "ranking": [1.0, 0]}, 400, "ranking", "entry 0 holds 1.0"),
        ({"comparison_id": cid, "ranking": [[0, [1]], 2]}, 400, "ranking", "entry 0 holds [1]"),
        ({"comparison_id": cid, "ranking": "0,1"}, 400, "ranking", "valid array"),
        ({"comparison_id": cid}, 400, "ranking", "Field required"),
        ({"comparison_id": cid, "ranking": [0, 1], "score": 3}, 400, "score", "unknown field 'score'"),
        ({"comparison_id": "a b", "ranking": [0, 1]}, 400, "comparison_id", "should match pattern"),
    ]
    for body, status, param, message in cases:
        response = await client.post("/v1/feedback", json=body)
        assert response.status_code == status, body
        error = response.json()["error"]
        assert error["param"] == param and message in error["message"], (body, error)
    garbled = await client.post(
        "/v1/feedback", content=b'{"comparison_id": ', headers={"content-type": "application/json"}
    )
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "invalid_json"
    oversized = await client.post("/v1/feedback", json={"comparison_id": cid, "ranking": [0, 1], "user": "x" * 5000})
    assert oversized.status_code == 413
    assert await redis.exists(STREAM) == 0


async def test_redis_down_is_503_with_retry_after(engine: FakeEngine, unused_port: int) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{unused_port}/0", retry=None)
    app = create_app(
        load_settings(max_model_len=256, max_tokens_limit=128, default_max_tokens=64), engine, dead, "v0001"
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for path, body in (
            ("/v1/feedback", {"comparison_id": "chatcmpl-1", "ranking": [0, 1]}),
            ("/v1/demonstrations", {"messages": [{"role": "user", "content": "hi"}], "answer": "hello"}),
        ):
            response = await client.post(path, json=body)
            assert response.status_code == 503 and response.headers["retry-after"] == "5"
            assert response.json()["error"]["code"] == "redis_unavailable"
    await dead.aclose()


async def test_a_demonstration_for_a_served_prompt(client: httpx.AsyncClient, redis: Redis) -> None:
    served = await comparison(client)
    response = await client.post(
        "/v1/demonstrations", json={"comparison_id": served["id"], "answer": "Blue.", "user": "fay"}
    )
    assert response.status_code == 201
    [event] = await stream_events(redis)
    assert event["kind"] == "demonstration" and event["messages"] == ASK["messages"]
    assert event["answer"] == "Blue." and event["policy_version"] == "v0001" and event["comparison_id"] == served["id"]


async def test_a_demonstration_with_its_own_messages_and_its_retry(client: httpx.AsyncClient, redis: Redis) -> None:
    body = {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "user": "gus"}
    first = await client.post("/v1/demonstrations", json=body)
    again = await client.post("/v1/demonstrations", json=body)
    other = await client.post("/v1/demonstrations", json={**body, "answer": "Four."})
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    assert await redis.xlen(STREAM) == 2


async def test_bad_demonstrations_are_refused(client: httpx.AsyncClient, redis: Redis) -> None:
    user = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"answer": "x"}, 400, "give either 'messages'"),
        ({"messages": user, "comparison_id": "chatcmpl-1", "answer": "x"}, 400, "give either 'messages'"),
        ({"messages": user, "answer": "  "}, 400, "'answer' is blank"),
        ({"messages": user, "answer": ""}, 400, "at least 1 character"),
        ({"messages": [{"role": "assistant", "content": "a"}], "answer": "x"}, 400, "last message must have role"),
        ({"messages": [{"role": "robot", "content": "a"}], "answer": "x"}, 400, "messages.0.role"),
        ({"comparison_id": "chatcmpl-gone", "answer": "x"}, 404, "unknown or has expired"),
    ]
    for body, status, message in cases:
        response = await client.post("/v1/demonstrations", json=body)
        assert response.status_code == status, body
        assert message in response.json()["error"]["message"], (body, response.json())
    assert await redis.exists(STREAM) == 0


async def test_the_api_schema_documents_the_feedback_bodies(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    body = paths["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"comparison_id", "ranking", "user", "idempotency_key"}
    assert "/v1/demonstrations" in paths


async def test_feedback_not_sent_as_json_or_from_another_sites_page_is_refused_and_not_recorded(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    served = await comparison(client)
    ranking = {"comparison_id": served["id"], "ranking": [0, 1, 2, 3], "user": "ann"}
    # What a page elsewhere can make a browser send without asking the server first: a text/plain POST.
    plain = await client.post("/v1/feedback", content=json.dumps(ranking), headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "Content-Type: application/json" in plain.json()["error"]["message"]
    form = await client.post("/v1/demonstrations", data={"answer": "x"})
    assert form.status_code == 415
    elsewhere = await client.post("/v1/feedback", json=ranking, headers={"origin": "http://evil.example"})
    assert elsewhere.status_code == 403 and elsewhere.json()["error"]["code"] == "cross_site"
    assert "http://evil.example" in elsewhere.json()["error"]["message"]
    assert await stream_events(redis) == []  # nothing of the refused three was recorded
    own_page = await client.post("/v1/feedback", json=ranking, headers={"origin": "http://test"})
    assert own_page.status_code == 201
    assert await kinds(redis) == ["comparison", "ranking"]
