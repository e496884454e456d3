"""HTTP routes of the feedback API: a few lines each over FeedbackService.

The body is validated by pydantic straight from the raw bytes (one pass in Rust) rather than through FastAPI's
body parameter (JSON to Python objects, then validation, then the dependency machinery): at thousands of rankings
per second that route overhead is most of the cost. The OpenAPI schema is declared explicitly instead.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.routing import Route

from api.cross_site import check_json_from_own_origin
from deploy.auth import identify
from deploy.keys import KeyRecord
from deploy.quota import Quotas
from feedback.models import Accepted, DemonstrationRequest, FeedbackRequest
from feedback.service import FeedbackService

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


def _service(request: Request) -> FeedbackService:
    service: FeedbackService = request.app.state.feedback
    return service


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}
    return {"requestBody": schema}


async def _parse(model: type[M], request: Request) -> M:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        # The same handler as every other route: 400 naming the field.
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc


def _reply(accepted: Accepted) -> Response:
    # 201 for a new event, 200 for a retry of one already accepted (the body says `duplicate: true`).
    return Response(
        accepted.model_dump_json(exclude_none=True),
        status_code=200 if accepted.duplicate else 201,
        media_type="application/json",
    )


def _allowed(request: Request) -> None:
    check_json_from_own_origin(request, request.app.state.allowed_origins)


async def _quota(request: Request, key: KeyRecord | None, kind: str) -> None:
    quotas: Quotas = request.app.state.quotas
    await quotas.take_for(request, key.name if key is not None else None, {kind: 1})


async def feedback(request: Request) -> Response:
    _allowed(request)
    key = await identify(request, "user")
    body = await _parse(FeedbackRequest, request)
    await _quota(request, key, "ranking")
    return _reply(await _service(request).rank(body, key))


async def demonstrations(request: Request) -> Response:
    _allowed(request)
    key = await identify(request, "user")
    body = await _parse(DemonstrationRequest, request)
    await _quota(request, key, "demonstration")
    return _reply(await _service(request).demonstrate(body, key))


# The OpenAPI schema and docs come from these FastAPI routes ...
for path, endpoint, model in (
    ("/v1/feedback", feedback, FeedbackRequest),
    ("/v1/demonstrations", demonstrations, DemonstrationRequest),
):
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        status_code=201,
        response_model=Accepted,
        responses={200: {"model": Accepted, "description": "A retry of an event already accepted (`duplicate`)"}},
        openapi_extra=_body_schema(model),
    )

# ... and requests go to these plain routes, placed first in the app: FastAPI's per-request dependency solving and
# the scan over the routes before them cost more than everything else a ranking needs on this path.
fast_routes = [
    Route("/v1/feedback", feedback, methods=["POST"]),
    Route("/v1/demonstrations", demonstrations, methods=["POST"]),
]
