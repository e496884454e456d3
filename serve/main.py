"""`rankloop serve`: start the engine, connect to Redis, run the HTTP server."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time

import uvicorn
import uvloop
from fastapi import FastAPI

from deploy.model_store import ModelStore, StoreError
from deploy.promotion import servable, sync_store
from deploy.redis_clients import async_redis, sync_redis
from deploy.redis_server import persistence_warning
from deploy.registry import Registry
from deploy.settings import Settings
from serve.app import create_app
from serve.engine import Engine, GenerationRequest
from serve.follower import RegistryFollower, serving_plan
from serve.swap import ServedVersion

log = logging.getLogger("rankloop.serve")


def _build_engine(settings: Settings, base: str, store: ModelStore) -> Engine:
    model_dir = store.path(base)
    if settings.engine == "fake":
        from transformers import AutoTokenizer

        from serve.fake_engine import FakeEngine

        return FakeEngine(
            AutoTokenizer.from_pretrained(model_dir), settings.max_model_len, adapters=settings.adapters_served
        )
    if settings.engine == "hf":
        from serve.hf_engine import HFEngine

        return HFEngine(model_dir, settings.max_model_len)
    from serve.vllm_engine import VllmEngine

    return VllmEngine.start(settings, model_dir)


def uvicorn_config(app: FastAPI, host: str, port: int, access_log: bool = False) -> uvicorn.Config:
    # httptools and no per-request log line: at thousands of rankings per second both show in the profile.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        http="httptools",
        lifespan="off",
        loop="uvloop",
    )


def _starting_version(settings: Settings, store: ModelStore) -> tuple[str, int, str | None]:
    """(version, epoch, why not the registry's current) to start on: the setting's version when pinned, else the
    registry's current version, or the last sound one where that is failed (deploy.promotion.servable)."""
    if settings.policy_version is not None:
        return settings.policy_version, 0, None
    from redis.exceptions import RedisError

    try:
        client = sync_redis(settings)
        warning = persistence_warning(client)
        if warning is not None:
            log.warning("%s", warning)
        registry = Registry(client)
        sync_store(registry, store)
        version, epoch, why = servable(registry, store)
        if why is not None:
            log.warning("%s", why)
        if version is not None:
            return version, epoch, why
    except RedisError as exc:  # the follower catches up once Redis is back
        log.warning("registry unavailable (%s): starting on the model store's current version", exc)
    version = store.current()
    if version is None:
        raise StoreError(f"the model store {store.root} is empty: run `rankloop model import` first")
    # The store's epoch, not 0: a Redis that comes back from an older snapshot must not swap this server back.
    return version, store.current_epoch(), None


async def _warm_up(engine: Engine) -> None:
    """One short generation before the first user's: the engine's first forward pass sets up its kernels
    (seconds on CPU), which would otherwise land on whoever asks first, or on the first answer after a swap."""
    started = time.monotonic()
    ids = list(engine.tokenizer("Hello", add_special_tokens=False)["input_ids"])
    request = GenerationRequest("warm-up", ids, n=1, max_tokens=2, temperature=0.0, top_p=1.0)
    async for _ in engine.generate(request):
        pass
    log.info("engine warmed up in %.1f s", time.monotonic() - started)


def bind_listener(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound before anything slow: a port already taken fails in a second rather than after the
    engine has loaded, and no process started meanwhile (vLLM's own workers pick free ports too) can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise SystemExit(f"cannot listen on {host}:{port} ({exc.strerror}): set RANKLOOP_PORT to a free port") from exc


async def _serve(settings: Settings) -> None:
    listener = bind_listener(settings.host, settings.port)
    store = ModelStore(settings.store_dir)
    version, epoch, why = _starting_version(settings, store)
    base, adapter = serving_plan(store, version, settings.engine != "hf" and settings.adapters_served)
    engine = _build_engine(settings, base, store)  # whether it serves adapters: the same settings
    if adapter is not None:
        await engine.add_adapter(adapter)
    await _warm_up(engine)
    redis = async_redis(settings)
    served = ServedVersion(version, epoch, settings.swap_drain_timeout_s, base, adapter)
    served.last_error = why  # /healthz shows why it is not the registry's current version
    app = create_app(settings, engine, redis, served)
    follower = None
    if settings.policy_version is None:
        follower = asyncio.create_task(RegistryFollower(redis, served, engine, store, app.state.metrics).run())
    else:
        log.info("policy version pinned to %s by the settings: promotions are not followed", version)
    # Move everything loaded so far (tokenizer, engine client, libraries) out of the collector's sight: full
    # collections otherwise walk it all and stall every request for a quarter of a second at high rates.
    gc.collect()
    gc.freeze()
    config = uvicorn_config(app, settings.host, settings.port, settings.access_log)
    try:
        log.info("policy %s (epoch %d) ready; listening on http://%s:%d", version, epoch, settings.host, settings.port)
        await uvicorn.Server(config).serve(sockets=[listener])
    finally:
        if follower is not None:
            follower.cancel()
        await engine.shutdown()
        await redis.aclose()


def run(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(_serve(settings))  # the loop uvicorn would pick itself; vLLM's own server runs on it too
