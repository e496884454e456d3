"""`rankloop serve`: start the engine, connect to Redis, run the HTTP server."""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from redis.asyncio import Redis

from deploy.model_store import ModelStore, StoreError
from deploy.settings import Settings
from serve.app import create_app
from serve.engine import Engine

log = logging.getLogger("rankloop.serve")


def _build_engine(settings: Settings, version: str, store: ModelStore) -> Engine:
    model_dir = store.path(version)
    if settings.engine == "fake":
        from transformers import AutoTokenizer

        from serve.fake_engine import FakeEngine

        return FakeEngine(AutoTokenizer.from_pretrained(model_dir), settings.max_model_len)
    from serve.vllm_engine import VllmEngine

    return VllmEngine.start(settings, model_dir)


async def _serve(settings: Settings) -> None:
    store = ModelStore(settings.store_dir)
    version = settings.policy_version or store.current()
    if version is None:
        raise StoreError(f"the model store {store.root} is empty: run `rankloop model import` first")
    engine = _build_engine(settings, version, store)
    redis = Redis.from_url(settings.effective_redis_url)
    app = create_app(settings, engine, redis, version)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", lifespan="off")
    try:
        log.info("policy %s ready; listening on http://%s:%d", version, settings.host, settings.port)
        await uvicorn.Server(config).serve()
    finally:
        await engine.shutdown()
        await redis.aclose()


def run(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(settings))
