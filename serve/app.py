"""Assemble the FastAPI app around a ready engine and Redis client."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from redis.asyncio import Redis

from deploy.settings import Settings
from feedback.comparisons import ComparisonStore
from serve.chat import ChatService
from serve.engine import Engine
from serve.errors import ApiError, api_error_handler, error_response, validation_error_handler
from serve.limits import BodySizeLimit
from serve.metrics import ServeMetrics
from serve.routes import router


def create_app(settings: Settings, engine: Engine, redis: Redis, policy_version: str) -> FastAPI:
    app = FastAPI(title="rankloop", version="0.1.0")
    metrics = ServeMetrics()
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.chat = ChatService(
        engine, ComparisonStore(redis, settings.comparison_ttl_s), settings, metrics, policy_version
    )
    app.include_router(router)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> Response:
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
