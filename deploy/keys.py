"""API keys: who may chat, rank and operate. Kept in Redis by the SHA-256 of the key (a key is 32 random bytes, so
a fast hash is enough; the key itself is shown once, when it is made, and stored nowhere).

One hash, `rankloop:keys`: digest → JSON record (name, role, created, revoked). A revoked key keeps its record, so
that `keys list` shows who had access and when it ended.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

KEYS_KEY = "rankloop:keys"
LIVE_KEY = "rankloop:keys:live"  # name → digest of its live key: HSETNX makes "one live key a name" atomic
PREFIX = "rk_"
Role = Literal["user", "rater", "admin"]
ROLES: tuple[Role, ...] = ("user", "rater", "admin")
# What each role may do is what the one before it may, and more: a rater ranks any comparison, not only its own;
# an admin also uses /admin/.
RANK: dict[Role, int] = {role: level for level, role in enumerate(ROLES)}
NAME_PATTERN = r"^[A-Za-z0-9_.@\-]{1,64}$"


class KeyError_(ValueError):
    """A key operation the store refuses (a name in use, no such name): the message says what to do."""


@dataclass(frozen=True)
class KeyRecord:
    name: str
    role: Role
    created: float
    revoked: float | None = None
    hint: str = ""  # the key's first characters, to tell keys apart in a listing

    def may(self, needed: Role) -> bool:
        return self.revoked is None and RANK[self.role] >= RANK[needed]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _record(raw: Any) -> KeyRecord:
    return KeyRecord(**json.loads(raw))


class KeyStore:
    """Creating, listing and revoking keys (the CLI's side): a synchronous client."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def records(self) -> list[KeyRecord]:
        return sorted((_record(raw) for raw in self.redis.hvals(KEYS_KEY)), key=lambda r: r.created)

    def create(self, name: str, role: Role) -> str:
        """A new key for `name` (which no live key may have); returns the key, which nothing keeps."""
        if role not in ROLES:
            raise KeyError_(f"role '{role}' is not one of {', '.join(ROLES)}")
        if not re.match(NAME_PATTERN, name):
            raise KeyError_(f"name '{name}': use 1 to 64 letters, digits and . _ @ -")
        key = PREFIX + secrets.token_urlsafe(32)
        # Claim the name first: of two operators creating one name at once, one gets it and the other hears so.
        if not self.redis.hsetnx(LIVE_KEY, name, digest(key)):
            raise KeyError_(f"'{name}' already has a key: revoke it first, or choose another name")
        record = KeyRecord(name, role, time.time(), hint=key[: len(PREFIX) + 4])
        self.redis.hset(KEYS_KEY, digest(key), json.dumps(asdict(record)))
        return key

    def revoke(self, name: str) -> int:
        """Revoke every live key of `name`; returns how many."""
        revoked = 0
        for found, raw in cast(dict[bytes, bytes], self.redis.hgetall(KEYS_KEY)).items():
            record = _record(raw)
            if record.name == name and record.revoked is None:
                self.redis.hset(KEYS_KEY, found, json.dumps({**asdict(record), "revoked": time.time()}))
                revoked += 1
        self.redis.hdel(LIVE_KEY, name)
        if not revoked:
            raise KeyError_(f"no live key named '{name}' (`rankloop keys list` shows them)")
        return revoked


async def lookup(redis: AsyncRedis, key: str) -> KeyRecord | None:
    """The record of `key` (one HGET: every authenticated request makes it); None for a key never made."""
    raw = await redis.hget(KEYS_KEY, digest(key))
    return None if raw is None else _record(raw)
