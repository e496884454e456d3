from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.settings import load_settings
from serve.app import create_app
from serve.fake_engine import FakeEngine


@pytest.fixture
def engine(tokenizer) -> FakeEngine:  # type: ignore[no-untyped-def]
    return FakeEngine(tokenizer, max_model_len=256)


@pytest.fixture
async def client(engine: FakeEngine, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(max_model_len=256, max_tokens_limit=128, default_max_tokens=64, max_body_bytes=4096)
    app = create_app(settings, engine, redis, "v0001")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http
