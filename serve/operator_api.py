"""What the operator console reads besides versions and events (deploy.admin): where the learner stands, how the
model has been learning (the series `rankloop report` plots), the feedback pipeline's health, and the canary with
the leaderboard users' rankings make. Admin-only, like the rest of /admin/."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.errors import ApiError
from deploy.admin import AdminDep, Changes, registry_call, who_asked
from deploy.canary import NO_ADAPTERS, Canaries
from deploy.learner_status import read_status
from deploy.promotion import sync_store
from deploy.settings import Settings
from feedback.history import learning_history, thinned
from feedback.standings import standings
from feedback.status import health

router = APIRouter(prefix="/admin")


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


@router.get("/learner")
async def learner(admin: AdminDep) -> dict[str, Any]:
    """The learner's last published status: phase, detail, the round's progress and its last outcome (`status` is
    null before a learner ever ran)."""
    return {"status": await asyncio.to_thread(read_status, admin.registry.redis)}


@router.get("/history")
async def history(
    admin: AdminDep,
    request: Request,
    points: Annotated[int, Query(description="at most this many points a series (2 to 5000; clamped)")] = 400,
) -> dict[str, Any]:
    """Series of (unix time, value): rankings received (cumulative), reward models' held-out accuracy, PPO's figures
    per iteration, win rates against v0001 per preference (with the version of each point)."""
    found = await asyncio.to_thread(learning_history, _settings(request))
    at_most = min(max(points, 2), 5000)
    figures = asdict(found)
    figures["rankings"] = thinned(found.rankings, at_most)
    figures["ppo"] = {name: thinned(series, at_most) for name, series in found.ppo.items()}
    return figures


@router.get("/feedback")
async def feedback_health(admin: AdminDep, request: Request) -> dict[str, Any]:
    """The feedback pipeline, as `rankloop feedback stats --json` gives it: dataset counts, the stream's length,
    pending entries and lag against its bound, Redis's memory, warnings."""
    settings = _settings(request)
    return await asyncio.to_thread(health, admin.registry.redis, settings.dataset_path, settings.feedback_max_backlog)


class CanaryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=64, description="The candidate, a ready version")
    share: float = Field(0.25, gt=0.0, le=1.0, description="Share of comparisons that mix the two versions")
    split: int = Field(2, ge=1, le=64, description="Answers of a mixed comparison the candidate writes")
    reason: str = Field("", max_length=2000)
    who: str = Field("admin-api", min_length=1, max_length=256)


class StopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reject: bool = Field(False, description="Mark the candidate rejected: no promotion takes it")
    expected: str | None = Field(None, max_length=64, description="Refuse unless this is the running candidate")
    reason: str = Field("", max_length=2000)
    who: str = Field("admin-api", min_length=1, max_length=256)


@router.post("/canary/start", dependencies=Changes)
async def start_canary(body: CanaryBody, admin: AdminDep, request: Request) -> dict[str, Any]:
    """Put the candidate's answers beside the current version's in `share` of comparisons."""
    if not _settings(request).adapters_served:
        raise ApiError(409, NO_ADAPTERS, code="no_adapters")
    canaries, who = Canaries(admin.registry.redis), who_asked(request, body.who)
    await registry_call(admin, sync_store, admin.registry, admin.store)  # versions the learner wrote since
    canary = await registry_call(
        admin, canaries.start, admin.store, body.version, body.share, body.split, who, body.reason
    )
    return {"canary": asdict(canary)}


@router.get("/canary")
async def canary_status(admin: AdminDep, request: Request) -> dict[str, Any]:
    """The running canary (null: none) and the standings of the rankings since it started."""
    canary = await registry_call(admin, Canaries(admin.registry.redis).running)
    if canary is None:
        return {"canary": None, "standings": None}
    board = await asyncio.to_thread(standings, _settings(request).dataset_path, canary.current, canary.started)
    return {"canary": asdict(canary), "standings": asdict(board)}


@router.post("/canary/stop", dependencies=Changes)
async def stop_canary(body: StopBody, admin: AdminDep, request: Request) -> dict[str, Any]:
    canaries, who = Canaries(admin.registry.redis), who_asked(request, body.who)
    version = await registry_call(admin, canaries.stop, who, body.reason, body.expected, body.reject)
    return {"stopped": version, "rejected": body.reject}


@router.get("/leaderboard")
async def leaderboard(
    admin: AdminDep,
    request: Request,
    since: Annotated[float | None, Query(ge=0, description="only rankings accepted after this unix time")] = None,
) -> dict[str, Any]:
    """Every version compared in mixed comparisons: Bradley-Terry strength (log, mean 0) and win rate over the
    current version with its 95% interval."""
    current, _ = await registry_call(admin, admin.registry.current)
    board = await asyncio.to_thread(standings, _settings(request).dataset_path, current, since)
    return asdict(board)
