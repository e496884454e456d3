"""HTTP routes: a few lines each over the services held in app.state."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList
from deploy.auth import identify
from deploy.quota import Quotas
from deploy.redis_server import memory_warning
from serve.chat import MODEL_NAME, Caller, ChatService
from serve.limits import TimedStreamingResponse

router = APIRouter()


def _chat(request: Request) -> ChatService:
    service: ChatService = request.app.state.chat
    return service


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | Response:
    service = _chat(request)
    caller = await _caller(request)
    if body.stream:
        return TimedStreamingResponse(
            await service.stream(body, caller),
            service.settings.stream_send_timeout_s,
            media_type="text/event-stream",
        )
    return await service.complete(body, caller)


async def _caller(request: Request) -> Caller:
    """Who asks (401/403 without a fitting key), and their quota: checked once the request is valid (429 when
    spent), charged with the tokens generated."""
    key = await identify(request, "user")
    name = key.name if key is not None else None
    quotas: Quotas = request.app.state.quotas
    holders = quotas.holders_of(request, name)
    if not holders:
        return Caller(name)

    async def admit() -> None:
        await quotas.take(holders, {"chat": 1, "tokens": 0})

    async def charge(tokens: int) -> None:
        await quotas.take(holders, {"tokens": -tokens})

    return Caller(name, admit, charge)


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    service = _chat(request)
    card = ModelCard(id=MODEL_NAME, created=request.app.state.started, policy_version=service.policy_version)
    return ModelList(data=[card])


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    service = _chat(request)
    engine_ok = await service.engine.healthy()
    memory: dict[str, Any] | None = None
    try:
        redis_ok = bool(await service.comparisons.redis.ping())
        memory = await service.comparisons.redis.info("memory")
    except Exception:  # any failure to reach Redis is "down" for the operator
        redis_ok = False
    engine_ok = engine_ok and service.served.broken is None  # running, but on weights no version names
    body: dict[str, Any] = {
        "status": "ok" if engine_ok and redis_ok else "degraded",
        "engine": "ok" if engine_ok else ("no weights" if service.served.broken else "down"),
        "redis": "ok" if redis_ok else "down",
        "policy_version": service.policy_version,
        "epoch": service.served.epoch,
        "swap_error": service.served.broken or service.served.last_error,
    }
    if memory is not None:
        limit = int(memory.get("maxmemory", 0))
        body["redis_memory"] = {"used_bytes": int(memory["used_memory"]), "max_bytes": limit}
        warning = memory_warning(memory)
        if warning is not None:  # a warning, not a failure: Redis still takes writes
            body["warnings"] = [warning]
    if service.served.last_swap is not None:
        body["last_swap"] = asdict(service.served.last_swap)
    return JSONResponse(body, status_code=200 if engine_ok and redis_ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    state.metrics.engine_unfinished.set(_chat(request).engine.unfinished())  # read at scrape time
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
