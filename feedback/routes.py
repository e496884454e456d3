"""HTTP routes of the feedback API: a few lines each over FeedbackService."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from feedback.models import Accepted, DemonstrationRequest, FeedbackRequest
from feedback.service import FeedbackService

router = APIRouter()


def _service(request: Request) -> FeedbackService:
    service: FeedbackService = request.app.state.feedback
    return service


def _reply(accepted: Accepted) -> JSONResponse:
    # 201 for a new event, 200 for a retry of one already accepted (the body says `duplicate: true`).
    return JSONResponse(accepted.model_dump(exclude_none=True), status_code=200 if accepted.duplicate else 201)


@router.post("/v1/feedback", status_code=201)
async def feedback(body: FeedbackRequest, request: Request) -> JSONResponse:
    accepted = await _service(request).rank(body)
    return _reply(accepted)


@router.post("/v1/demonstrations", status_code=201)
async def demonstrations(body: DemonstrationRequest, request: Request) -> JSONResponse:
    accepted = await _service(request).demonstrate(body)
    return _reply(accepted)
