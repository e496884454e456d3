"""No client and no long answer can hold a swap: a streaming client that stops reading holds only its own
connection, and generations still running at the drain deadline are aborted (choices end "abort", the comparison
is not stored)."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from starlette.types import Message

from api.metrics import ServeMetrics
from api.protocol import ChatCompletionRequest
from deploy.settings import load_settings
from feedback.comparisons import ComparisonStore
from serve.chat import ChatService
from serve.fake_engine import FakeEngine
from serve.limits import TimedStreamingResponse
from serve.swap import ServedVersion

ASK = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 32, "n": 2}


def service(tokenizer: Any, redis: Redis, step_s: float, drain_timeout_s: float = 30.0) -> ChatService:
    engine = FakeEngine(tokenizer, step_s=step_s)
    served = ServedVersion("v0001", drain_timeout_s=drain_timeout_s)
    return ChatService(engine, ComparisonStore(redis, 60), load_settings(), ServeMetrics(), served)


async def swap_to_v0002(chat: ChatService) -> float:
    """Seconds the swap took, its load a no-op."""

    async def load() -> None:
        pass

    started = time.monotonic()
    await asyncio.wait_for(chat.served.swap("v0002", 1, load), timeout=10)
    return time.monotonic() - started


async def test_a_client_that_stops_reading_does_not_hold_the_swap(tokenizer: Any, redis: Redis) -> None:
    chat = service(tokenizer, redis, step_s=0.01)
    body = await chat.stream(ChatCompletionRequest.model_validate({**ASK, "stream": True}))
    first = await anext(body)  # then the client reads nothing more: the body waits at its next yield
    assert '"policy_version":"v0001"' in first
    took = await swap_to_v0002(chat)
    assert took < 2.0 and chat.served.version == "v0002" and chat.served.aborted == 0
    rest = [line async for line in body]  # the client reads again: its whole answer, from the old version
    assert rest[-1] == "data: [DONE]\n\n"
    assert all('"policy_version":"v0001"' in line for line in rest[:-1])
    assert sum('"finish_reason":"stop"' in line for line in rest) == 2
    assert len(await redis.keys("rankloop:comparison:*")) == 1  # a whole answer is kept for ranking


async def test_a_generation_past_the_drain_deadline_is_aborted(tokenizer: Any, redis: Redis) -> None:
    chat = service(tokenizer, redis, step_s=0.3, drain_timeout_s=0.2)  # ~8 tokens: 2.4 s of generation
    answer = asyncio.create_task(chat.complete(ChatCompletionRequest.model_validate(ASK)))
    while chat.served.in_flight == 0:
        await asyncio.sleep(0.01)
    took = await swap_to_v0002(chat)
    assert 0.2 <= took < 1.5 and chat.served.aborted == 1
    response = await answer
    assert response.policy_version == "v0001"  # what wrote the tokens it has
    assert [c.finish_reason for c in response.choices] == ["abort", "abort"]
    assert await redis.keys("rankloop:comparison:*") == []  # a cut answer is not offered for ranking
    assert set(chat.engine.aborted) == {response.id}  # type: ignore[attr-defined]
    later = await chat.complete(ChatCompletionRequest.model_validate({**ASK, "max_tokens": 2}))
    assert later.policy_version == "v0002"


async def test_a_stream_past_the_drain_deadline_ends_each_choice_with_abort(tokenizer: Any, redis: Redis) -> None:
    chat = service(tokenizer, redis, step_s=0.3, drain_timeout_s=0.2)
    body = await chat.stream(ChatCompletionRequest.model_validate({**ASK, "stream": True}))
    lines = [await anext(body)]
    swap = asyncio.create_task(swap_to_v0002(chat))
    lines += [line async for line in body]
    assert await swap < 1.5
    assert lines[-1] == "data: [DONE]\n\n"
    assert sum('"finish_reason":"abort"' in line for line in lines) == 2
    assert not any('"finish_reason":"stop"' in line for line in lines)
    assert await redis.keys("rankloop:comparison:*") == []


async def test_a_stream_whose_client_reads_nothing_is_closed_after_the_send_timeout() -> None:
    closed = asyncio.Event()

    async def lines() -> AsyncIterator[str]:
        try:
            for _ in range(100):
                yield "data: x\n\n"
        finally:
            closed.set()

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if len(sent) > 2:  # the socket is full: this send never returns
            await asyncio.Event().wait()

    response = TimedStreamingResponse(lines(), send_timeout_s=0.2, media_type="text/event-stream")
    started = time.monotonic()
    await asyncio.wait_for(response.stream_response(send), timeout=5)
    assert time.monotonic() - started < 1.0
    assert closed.is_set() and len(sent) == 3


@pytest.mark.parametrize("key", ["swap_drain_timeout_s", "stream_send_timeout_s"])
def test_the_deadlines_are_settings(key: str) -> None:
    assert getattr(load_settings(**{key: 2.5}), key) == 2.5
