"""Fixtures of the serve tests: a registry over the module's `store`, and one in-process replica following it."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from deploy.model_store import ModelStore
from deploy.promotion import sync_store
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry
from tests.serve.replicas import Replica


@pytest.fixture
def registry(redis: Redis, redis_server: EmbeddedRedis, store: ModelStore) -> Registry:
    registry = Registry(SyncRedis.from_url(redis_server.url))
    sync_store(registry, store)
    return registry


@pytest.fixture
async def replica(redis: Redis, store: ModelStore, registry: Registry, tokenizer: Any) -> AsyncIterator[Replica]:
    server = Replica(redis, store, tokenizer)
    yield server
    await server.close()
