"""`rankloop serve`: start the engine, connect to Redis, run the HTTP server."""

from __future__ import annotations

import gc
import logging

import uvicorn
import uvloop
from fastapi import FastAPI
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


def uvicorn_config(app: FastAPI, host: str, port: int, access_log: bool = False) -> uvicorn.Config:
    # httptools and no per-request log line: at thousands of rankings per second both show in the profile.
    return uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=access_log, http="httptools", lifespan="off",
        loop="uvloop",
    )  # fmt: skip


async def _serve(settings: Settings) -> None:
    store = ModelStore(settings.store_dir)
    version = settings.policy_version or store.current()
    if version is None:
        raise StoreError(f"the model store {store.root} is empty: run `rankloop model import` first")
    engine = _build_engine(settings, version, store)
    redis = Redis.from_url(settings.effective_redis_url)
    app = create_app(settings, engine, redis, version)
    # Move everything loaded so far (tokenizer, engine client, libraries) out of the collector's sight: full
    # collections otherwise walk it all and stall every request for a quarter of a second at high rates.
    gc.collect()
    gc.freeze()
    config = uvicorn_config(app, settings.host, settings.port, settings.access_log)
    try:
        log.info("policy %s ready; listening on http://%s:%d", version, settings.host, settings.port)
        await uvicorn.Server(config).serve()
    finally:
        await engine.shutdown()
        await redis.aclose()


def run(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(_serve(settings))  # the loop uvicorn would pick itself; vLLM's own server runs on it too
