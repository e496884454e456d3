"""Who is asking: `RANKLOOP_AUTH=keys` makes chat, feedback and admin routes want `Authorization: Bearer <key>`
(deploy.keys); `open` (the default) lets anyone in, and is allowed only on a loopback address, where only this
machine's own users reach the server.

Why it matters more here than in a chat server: rankings and demonstrations move the weights every user then talks
to. With keys, a ranking's user is the key's name (not whatever the body says), and a `user` key may rank only the
comparisons it asked for; a `rater` ranks any, an `admin` also operates.
"""

from __future__ import annotations

import ipaddress

from fastapi import Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import ApiError, redis_unavailable
from deploy.keys import KeyRecord, Role, lookup
from deploy.settings import Settings

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


class ExposedError(RuntimeError):
    """The server would let anyone on the network teach the model: it does not start."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that resolves elsewhere, or all addresses ("0.0.0.0" parses and is not loopback)


def check_exposure(settings: Settings) -> None:
    """Refuse `open` on an address other machines reach, unless the operator says so in as many words."""
    if settings.auth == "open" and not is_loopback(settings.host) and not settings.auth_open_anywhere:
        raise ExposedError(
            f"RANKLOOP_AUTH=open lets anyone who reaches {settings.host}:{settings.port} chat, rank and so train the "
            "model: set RANKLOOP_AUTH=keys and create keys with `rankloop keys create NAME --role user`, bind "
            "127.0.0.1, or set RANKLOOP_AUTH_OPEN_ANYWHERE=true if a proxy in front already checks who is asking"
        )


class Auth:
    def __init__(self, mode: str, redis: Redis) -> None:
        self.mode, self.redis = mode, redis

    async def identify(self, request: Request, needed: Role) -> KeyRecord | None:
        """The key's record when it may do what `needed` allows; None with `open` (anyone, no name).
        401: no key or an unknown or revoked one; 403: a key whose role is below `needed`; 503: Redis away."""
        if self.mode == "open":
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "this server wants an API key: send `Authorization: Bearer <key>` (an operator makes one with "
                "`rankloop keys create NAME --role user`)",
                code="unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            record = await lookup(self.redis, key.strip())
        except RedisError as exc:
            raise redis_unavailable("API keys") from exc
        if record is None or record.revoked is not None:
            raise ApiError(
                401,
                "unknown or revoked API key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not record.may(needed):
            raise ApiError(
                403, f"the key of '{record.name}' has the role {record.role}; this needs {needed}", code="forbidden"
            )
        return record


async def identify(request: Request, needed: Role) -> KeyRecord | None:
    """`Auth.identify` with the app's settings (a route's one line)."""
    auth: Auth = request.app.state.auth
    return await auth.identify(request, needed)
