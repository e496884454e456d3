"""An in-process server replica over the fake engine with its registry follower, for the swap tests."""

import asyncio
from pathlib import Path
from typing import Any

import httpx
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from deploy.model_store import ModelStore
from deploy.registry import Registry
from deploy.settings import load_settings
from serve.app import create_app
from serve.fake_engine import FakeEngine
from serve.follower import RegistryFollower
from serve.swap import ServedVersion
from tests.tiny import publish_adapter_version, tiny_versions_store

ADAPTERS = ("v0004", "v0005")
ASK = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 32, "n": 2}


class Replica:
    """One server: the app over a fake engine, its follower running."""

    def __init__(self, redis: Redis, store: ModelStore, tokenizer: Any, **settings: Any) -> None:
        self.engine = FakeEngine(tokenizer, max_model_len=256, step_s=0.01)
        self.engine.load_s = 0.05
        current, epoch = Registry(SyncRedis.from_url(_url(redis))).current()
        assert current is not None
        self.served = ServedVersion(current, epoch)
        self.settings = load_settings(max_model_len=256, max_tokens_limit=128, default_max_tokens=64, **settings)
        self.app = create_app(self.settings, self.engine, redis, self.served)
        self.follower = RegistryFollower(redis, self.served, self.engine, store, self.app.state.metrics)
        self.task = asyncio.create_task(self.follower.run(block_ms=50))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t")

    async def close(self) -> None:
        self.task.cancel()
        await self.http.aclose()


def _url(redis: Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def adapters_store(tmp_path: Path) -> ModelStore:
    """v0001 current, v0002 and v0003 full weights, v0004 and v0005 adapters on v0001."""
    store = tiny_versions_store(tmp_path)
    for version in ADAPTERS:
        publish_adapter_version(store, version, rank=4)
    return store


def writer(text: str) -> str:
    """The version whose weights or adapter wrote an answer (the fake engine names it; the base names none)."""
    return next((v for v in ("v0002", *ADAPTERS) if f" from {v}" in text), "v0001")
