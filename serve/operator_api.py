"""What the operator console reads besides versions and events (deploy.admin): where the learner stands, how the
model has been learning (the series `rankloop report` plots), and the feedback pipeline's health. Admin-only, like
the rest of /admin/."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from deploy.admin import AdminDep
from deploy.learner_status import read_status
from deploy.settings import Settings
from feedback.history import learning_history, thinned
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
