"""Assemble the FastAPI app around a ready engine and Redis client."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.errors import ApiError, api_error_handler, error_response, http_error_handler, validation_error_handler
from api.metrics import RequestCounter, ServeMetrics
from api.openapi import document
from deploy.admin import Admin
from deploy.admin import router as admin_router
from deploy.auth import Auth
from deploy.model_store import ModelStore
from deploy.quota import Quotas
from deploy.redis_clients import sync_redis
from deploy.settings import Settings
from feedback.comparisons import ComparisonStore
from feedback.routes import fast_routes
from feedback.routes import router as feedback_router
from feedback.service import FeedbackService
from feedback.stream import FeedbackStream
from serve.chat import ChatService
from serve.engine import Engine
from serve.limits import BodySizeLimit
from serve.operator_api import router as operator_router
from serve.pages import router as pages_router
from serve.pages import static
from serve.routes import router
from serve.swap import ServedVersion

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine, redis: Redis, served: ServedVersion | str) -> FastAPI:
    """The HTTP app over a ready engine; `served` is the version the engine holds (a name: epoch 0)."""
    app = FastAPI(title="rankloop", version="0.1.0")
    metrics = ServeMetrics()
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.settings = settings
    # Besides the server's own origin (api.cross_site).
    app.state.allowed_origins = frozenset(o.rstrip("/") for o in settings.allowed_origins)
    comparisons = ComparisonStore(redis, settings.comparison_ttl_s)
    served = ServedVersion(served, drain_timeout_s=settings.swap_drain_timeout_s) if isinstance(served, str) else served
    app.state.served = served
    app.state.chat = ChatService(engine, comparisons, settings, metrics, served)
    app.state.feedback = FeedbackService(
        comparisons,
        FeedbackStream(redis, max_backlog=settings.feedback_max_backlog),
        settings.idempotency_ttl_s,
        metrics,
        settings.max_rankings_per_comparison,
    )
    app.state.quotas = Quotas(redis, settings)
    app.include_router(router)
    app.include_router(feedback_router)
    app.include_router(admin_router)
    app.include_router(operator_router)
    app.include_router(pages_router)
    app.mount("/static", static, name="static")
    app.state.auth = Auth(settings.auth, redis)
    app.state.admin = None
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    if token or settings.auth == "keys":  # the admin token, or keys of the admin role
        app.state.admin = Admin(sync_redis(settings), ModelStore(settings.store_dir), token or None)
    else:
        log.warning("admin API disabled: no RANKLOOP_ADMIN_TOKEN configured (there is no default token)")
    app.router.routes[0:0] = fast_routes
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> Response:
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    document(app)
    app.add_middleware(RequestCounter, counter=metrics.requests)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
