"""The chat endpoint on the real engine and model, through the official openai client."""

import json
import re
import time

import httpx
import pytest
import redis
from openai import OpenAI
from transformers import AutoTokenizer

from tests.integration.conftest import Stack

pytestmark = [pytest.mark.slow, pytest.mark.integration]
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def _client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _comparison(stack: Stack, comparison_id: str) -> dict:  # type: ignore[type-arg]
    raw = redis.Redis.from_url(stack.redis.url).hget(f"rankloop:comparison:{comparison_id}", "json")
    assert raw is not None, "comparison not stored"
    stored: dict = json.loads(raw)  # type: ignore[type-arg]
    return stored


def test_four_candidates_stored_as_a_comparison(stack: Stack) -> None:
    response = _client(stack).chat.completions.create(
        model="rankloop",
        messages=QUESTION,
        n=4,
        max_tokens=32,
        temperature=0.8,  # type: ignore[arg-type]
    )
    answers = [c.message.content or "" for c in response.choices]
    assert len(answers) == 4 and all(a.strip() for a in answers)
    assert response.model_extra == {"policy_version": "v0001"}

    stored = _comparison(stack, response.id)
    tokenizer = AutoTokenizer.from_pretrained(stack.store.path("v0001"))
    assert len(stored["candidates"]) == 4
    for candidate, answer in zip(stored["candidates"], answers, strict=True):
        assert tokenizer.decode(candidate["token_ids"], skip_special_tokens=True) == answer
        assert len(candidate["logprobs"]) == len(candidate["token_ids"])
        assert all(lp <= 0.0 for lp in candidate["logprobs"])
    assert stored["messages"] == QUESTION


def test_streaming_returns_every_choice(stack: Stack) -> None:
    stream = _client(stack).chat.completions.create(
        model="rankloop",
        messages=QUESTION,
        n=4,
        max_tokens=24,
        stream=True,  # type: ignore[arg-type]
    )
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    comparison_id = ""
    for chunk in stream:
        comparison_id = chunk.id
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2, 3] and sorted(finished) == [0, 1, 2, 3]
    stored = _comparison(stack, comparison_id)
    assert [c["text"] for c in stored["candidates"]] == [texts[i] for i in range(4)]


def test_disconnect_mid_stream_aborts_the_generation(stack: Stack) -> None:
    # ignore_eos: the answers cannot end early, so the engine is surely busy when the client leaves.
    body = {"messages": QUESTION, "n": 2, "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index == 8:
                running = httpx.get(f"{stack.base_url}/metrics").text
                assert re.search(r"^rankloop_engine_unfinished_requests 2\.0$", running, re.M), "engine idle"
                break  # leaving the loop closes the response: the client is gone
    # 2 x 1000 tokens would take well over 10 s here; an aborted request leaves the engine at once.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{stack.base_url}/metrics").text
        # The engine's own count, not ours: it proves the engine stopped, not only our generator.
        if re.search(r"^rankloop_engine_unfinished_requests 0\.0$", metrics, re.M):
            return
        time.sleep(0.2)
    pytest.fail("the generation was still running 10 s after the client left")


def test_prompt_longer_than_the_context_is_refused(stack: Stack) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"messages": long}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


def test_logprobs_come_from_the_engines_distribution(stack: Stack) -> None:
    response = _client(stack).chat.completions.create(
        model="rankloop", messages=QUESTION, n=2, max_tokens=16, temperature=1.0, logprobs=True, top_logprobs=3
    )
    stored = _comparison(stack, response.id)
    for choice, candidate in zip(response.choices, stored["candidates"], strict=True):
        assert choice.logprobs is not None and choice.logprobs.content is not None
        content = choice.logprobs.content
        # The same figures PPO reads from the stored comparison, token by token.
        assert [t.logprob for t in content] == pytest.approx(candidate["logprobs"], abs=1e-6)
        for token in content:
            best = [alternative.logprob for alternative in token.top_logprobs]
            assert len(best) == 3 and best == sorted(best, reverse=True)
            assert token.logprob <= best[0] + 1e-6  # nothing sampled is likelier than the likeliest


def test_answers_follow_a_json_schema(stack: Stack) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"colours": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["colours"],
        "additionalProperties": False,
    }
    response = _client(stack).chat.completions.create(
        model="rankloop",
        messages=QUESTION,
        n=2,
        max_tokens=128,  # the schema bounds the object to about 60 tokens: every answer ends by itself
        temperature=0.8,
        response_format={"type": "json_schema", "json_schema": {"name": "colours", "schema": schema}},
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice.message.content  # a whole object, not one cut short
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
