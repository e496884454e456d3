"""`logprobs`, `top_logprobs`, `response_format` and `tools` as OpenAI's clients send them, over the fake engine
(each token at -0.5; its alternatives the next token ids at -0.5, -1.5, -2.5, ...; JSON asked for, a JSON object)."""

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from serve.engine import GenerationRequest, JsonOutput
from serve.fake_engine import FakeEngine
from serve.hf_engine import HFEngine
from tests.tiny import tiny_llama_folder

HELLO = [{"role": "user", "content": "hello world"}]
ASK: dict[str, Any] = {"messages": HELLO, "max_tokens": 32, "temperature": 0.7, "seed": 5, "n": 2}


def _expected(tokenizer: Any, token_ids: list[int], top: int) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**entry(t, -0.5), "top_logprobs": [entry(t + j, -0.5 - j) for j in range(top)]} for t in token_ids]


async def _stored(redis: Redis, comparison_id: str) -> dict[str, Any]:
    stored: dict[str, Any] = json.loads(await redis.hget(f"rankloop:comparison:{comparison_id}", "json"))
    return stored


async def test_logprobs_and_top_logprobs_in_openais_shape(
    client: httpx.AsyncClient, redis: Redis, tokenizer: Any
) -> None:
    response = await client.post("/v1/chat/completions", json={**ASK, "logprobs": True, "top_logprobs": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    stored = await _stored(redis, body["id"])
    for choice, candidate in zip(body["choices"], stored["candidates"], strict=True):
        assert choice["logprobs"] == {"content": _expected(tokenizer, candidate["token_ids"], 2)}
        assert "".join(t["token"] for t in choice["logprobs"]["content"]) == choice["message"]["content"]


async def test_logprobs_alone_give_the_sampled_tokens_without_alternatives(
    client: httpx.AsyncClient, redis: Redis, tokenizer: Any, engine: FakeEngine
) -> None:
    body = (await client.post("/v1/chat/completions", json={**ASK, "logprobs": True})).json()
    stored = await _stored(redis, body["id"])
    content = body["choices"][1]["logprobs"]["content"]
    assert content == _expected(tokenizer, stored["candidates"][1]["token_ids"], 0)
    assert engine.requests[0].top_logprobs == 0


async def test_a_stream_carries_each_tokens_logprobs_with_its_text(
    client: httpx.AsyncClient, redis: Redis, tokenizer: Any
) -> None:
    body = {**ASK, "stream": True, "logprobs": True, "top_logprobs": 1}
    response = await client.post("/v1/chat/completions", json=body)
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    tokens: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if "logprobs" in choice:
                assert len(choice["logprobs"]["content"]) == 1  # the fake engine: one token a step
                assert choice["logprobs"]["content"][0]["token"] == choice["delta"]["content"]
                tokens[choice["index"]] += choice["logprobs"]["content"]
    stored = await _stored(redis, chunks[0]["id"])
    for index, candidate in enumerate(stored["candidates"]):
        assert tokens[index] == _expected(tokenizer, candidate["token_ids"], 1)


async def test_a_stream_without_logprobs_sends_none(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
    assert '"logprobs"' not in response.text


async def test_json_object_answers_are_json(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await client.post("/v1/chat/completions", json={**ASK, "response_format": {"type": "json_object"}})).json()
    assert [json.loads(c["message"]["content"]) for c in body["choices"]] == [
        {"answer": "answer 0: you said hello world"},
        {"answer": "answer 1: you said hello world"},
    ]
    assert engine.requests[0].json == JsonOutput(None)


async def test_a_json_schema_reaches_the_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    form = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    response = await client.post("/v1/chat/completions", json={**ASK, "response_format": form})
    assert response.status_code == 200, response.text
    assert engine.requests[0].json == JsonOutput(schema)


async def test_text_format_is_plain_text(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post("/v1/chat/completions", json={**ASK, "response_format": {"type": "text"}})
    assert response.status_code == 200 and engine.requests[0].json is None


async def _error(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        ({"top_logprobs": 2}, "", "top_logprobs needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"response_format": {"type": "xml"}}, "response_format", "'text', 'json_object', 'json_schema'"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema", "Field required"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
            "response_format.json_schema.json_schema.name",
            "should match pattern",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "thing"}}}},
            "response_format.json_schema.schema",
            "the JSON schema is not valid at type: 'thing' is not valid",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "the served model's chat template has no tool-calling format",
        ),
        ({"tool_choice": "auto"}, "tool_choice", "leave out `tools` and `tool_choice`"),
    ],
)
async def test_what_cannot_be_served_is_a_400_that_says_why(
    client: httpx.AsyncClient, redis: Redis, extra: dict[str, Any], param: str, fragment: str
) -> None:
    error = await _error(client, {**ASK, **extra})
    assert (error["param"] or "") == param and fragment in error["message"], error
    assert await redis.dbsize() == 0  # nothing stored


async def test_tool_choice_none_asks_for_nothing(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**ASK, "tool_choice": "none"})
    assert response.status_code == 200


async def test_the_official_client_reads_logprobs_and_json(client: httpx.AsyncClient) -> None:
    api = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=client)
    reply = await api.chat.completions.create(
        model="rankloop",
        messages=[{"role": "user", "content": "hello world"}],
        n=2,
        temperature=0.7,
        logprobs=True,
        top_logprobs=3,
        response_format={"type": "json_object"},
    )
    first = reply.choices[0]
    assert json.loads(first.message.content or "") == {"answer": "answer 0: you said hello world"}
    assert first.logprobs is not None and first.logprobs.content is not None
    assert [t.logprob for t in first.logprobs.content[0].top_logprobs] == [-0.5, -1.5, -2.5]


async def test_the_transformers_engine_reports_the_distribution_it_sampled_from(tmp_path: Path) -> None:
    engine = HFEngine(tiny_llama_folder(tmp_path / "tiny"), max_model_len=128)
    request = GenerationRequest("r", [1, 5, 9], n=2, max_tokens=6, temperature=0.8, top_p=1.0, seed=3, top_logprobs=4)
    deltas = [d async for step in engine.generate(request) for d in step]
    for delta in deltas:
        assert len(delta.top) == len(delta.token_ids) == len(delta.logprobs)
        for token_id, logprob, best in zip(delta.token_ids, delta.logprobs, delta.top, strict=True):
            assert len(best) == 4
            assert [lp for _, lp in best] == sorted((lp for _, lp in best), reverse=True)
            assert sum(2.718281828**lp for _, lp in best) <= 1.0 + 1e-5
            # The sampled token is among the alternatives at its own log-probability, or below the fourth.
            listed = dict(best)
            if token_id in listed:
                assert listed[token_id] == pytest.approx(logprob, abs=1e-4)
            else:
                assert logprob <= best[-1][1]


async def test_the_transformers_engine_refuses_json_with_a_reason(tmp_path: Path) -> None:
    from serve.engine import EngineInputError

    engine = HFEngine(tiny_llama_folder(tmp_path / "tiny"), max_model_len=128)
    request = GenerationRequest("r", [1, 5, 9], n=1, max_tokens=4, temperature=0.8, top_p=1.0, json=JsonOutput())
    with pytest.raises(EngineInputError, match="cannot constrain answers to JSON"):
        _ = [step async for step in engine.generate(request)]
