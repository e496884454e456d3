"""The admin HTTP API under /admin/: list and show versions, promote, roll back, read the events.

Protected by a bearer token from the settings (`RANKLOOP_ADMIN_TOKEN`) or, with `RANKLOOP_AUTH=keys`, an API key
of the admin role: nothing sent, or an unknown or revoked key -> 401; a wrong token (without keys) or a key of a
lower role -> 403; a change made with a key is logged under the key's name. There is no default token:
without one configured and without keys the admin routes answer 404 saying how to enable them, and the server says
so at start-up.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from redis import Redis

from api.cross_site import check_json_from_own_origin
from api.errors import ApiError
from deploy.auth import Auth
from deploy.model_store import ModelStore
from deploy.promotion import promote, rollback, sync_store
from deploy.registry import Conflict, Registry, RegistryError

bearer = HTTPBearer(auto_error=False)


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=64)
    reason: str = Field("", max_length=2000)
    who: str = Field("admin-api", min_length=1, max_length=256)
    expected: str | None = Field(None, description="Refuse unless this is still the current version.")


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(None, max_length=64, description="Default: the previous current version.")
    reason: str = Field("", max_length=2000)
    who: str = Field("admin-api", min_length=1, max_length=256)
    expected: str | None = Field(None, description="Refuse unless this is still the current version.")


class Admin:
    def __init__(self, redis: Redis, store: ModelStore, token: str | None) -> None:
        self.registry = Registry(redis)
        self.store = store
        self.token = token  # None: admin keys only

    def is_token(self, credentials: HTTPAuthorizationCredentials) -> bool:
        return self.token is not None and secrets.compare_digest(credentials.credentials.encode(), self.token.encode())


async def _admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Admin:
    admin: Admin | None = request.app.state.admin
    if admin is None:
        raise ApiError(
            404,
            "the admin API is disabled: set RANKLOOP_ADMIN_TOKEN, or RANKLOOP_AUTH=keys with keys of the admin role",
            code="not_found",
        )
    if credentials is None:
        raise ApiError(
            401,
            "the admin API needs `Authorization: Bearer <token>` (the admin token or an admin's API key)",
            code="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if admin.is_token(credentials):
        return admin
    auth: Auth = request.app.state.auth
    if auth.mode != "keys":
        raise ApiError(403, "wrong admin token", code="forbidden")
    key = await auth.identify(request, "admin")
    request.state.admin_key = key.name if key is not None else None  # the registry's `who`, not the body's
    return admin


def who_asked(request: Request, said: str) -> str:
    """Who made a change, for the registry's event log: an admin key's name, else what the token holder said."""
    key: str | None = getattr(request.state, "admin_key", None)
    return key or said


async def registry_call(admin: Admin, fn: Any, *args: Any) -> Any:
    """Registry calls are short blocking Redis round trips: run them off the event loop."""
    try:
        return await asyncio.to_thread(fn, *args)
    except Conflict as exc:
        raise ApiError(409, str(exc), code="conflict") from exc
    except RegistryError as exc:
        raise ApiError(400, str(exc), code="refused") from exc


AdminDep = Annotated[Admin, Depends(_admin)]


def _json_from_own_origin(request: Request) -> None:
    check_json_from_own_origin(request, request.app.state.allowed_origins)


Changes = [Depends(_json_from_own_origin)]  # on the routes that change the registry
router = APIRouter(prefix="/admin")


@router.get("/versions")
async def versions(admin: AdminDep) -> dict[str, Any]:
    await registry_call(admin, sync_store, admin.registry, admin.store)
    current, epoch = await registry_call(admin, admin.registry.current)
    listed = await registry_call(admin, admin.registry.versions)
    return {"current": current, "epoch": epoch, "versions": [asdict(v) for v in listed]}


@router.get("/versions/{version}")
async def show(version: str, admin: AdminDep) -> dict[str, Any]:
    info = await registry_call(admin, admin.registry.show, version)
    return asdict(info)


@router.post("/promote", dependencies=Changes)
async def promote_route(body: PromoteBody, admin: AdminDep, request: Request) -> dict[str, Any]:
    await registry_call(admin, sync_store, admin.registry, admin.store)
    who = who_asked(request, body.who)
    epoch = await registry_call(
        admin, promote, admin.registry, admin.store, body.version, who, body.reason, body.expected
    )
    return {"current": body.version, "epoch": epoch}


@router.post("/rollback", dependencies=Changes)
async def rollback_route(body: RollbackBody, admin: AdminDep, request: Request) -> dict[str, Any]:
    who = who_asked(request, body.who)
    version, epoch = await registry_call(
        admin, rollback, admin.registry, admin.store, who, body.reason, body.version, body.expected
    )
    return {"current": version, "epoch": epoch}


EVENT_ID = r"^(-|[0-9]{1,20}(-[0-9]{1,20})?)$"  # a Redis stream id; anything else made XRANGE fail (a 500)


@router.get("/events")
async def events(
    admin: AdminDep,
    after: Annotated[
        str, Query(pattern=EVENT_ID, description="the events after this id (from a listing); - from the start")
    ] = "-",
    count: Annotated[int, Query(description="at most this many (1 to 1000; values outside are clamped)")] = 100,
    newest: Annotated[bool, Query(description="the newest `count` events (oldest first); `after` is ignored")] = False,
) -> dict[str, Any]:
    if after != "-" and any(int(part) >= 2**64 for part in after.split("-")):
        raise ApiError(400, f"after: {after} is beyond any stream id (each part < 2^64)", "after", "invalid_value")
    count = min(max(count, 1), 1000)
    if newest:
        return {"events": [asdict(e) for e in await registry_call(admin, admin.registry.latest_events, count)]}
    listed = await registry_call(admin, admin.registry.events, after, count)
    return {"events": [asdict(e) for e in listed]}
