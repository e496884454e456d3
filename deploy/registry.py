"""The policy registry in Redis: which versions exist, their state, which one is current, and every change.

Keys (prefix `rankloop:registry:`):
- `version:<v>`: a hash per version: state (ready, current, retired, failed, rejected), parent, made_by, created,
  card, error;
- `versions`: an ordered set of the versions (score: the version number);
- `current`: the current version; `epoch`: a counter bumped by every change of `current`;
- `events`: a stream of changes (epoch, action, version, previous, who, why, time);
- `canary`: the version users judge beside the current one, while a canary runs (deploy.canary).

Promote and rollback are one compare-and-set script: it checks the expected current version and the target's
state, then retires the old version, moves the pointer, bumps the epoch and appends the event, atomically.
Replicas follow the events stream rather than pub/sub (which loses what is sent while a subscriber is away).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from deploy.redis_server import as_text


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float made None, through dicts and lists. Why: a card's figures hold NaN
    where nothing was measured (agreement on no held-out pairs), JSON has no NaN, and the admin API's responses
    refuse one, so a single such card would take the operator console's whole version list down."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


PREFIX = "rankloop:registry:"
VERSIONS, CURRENT, EPOCH, EVENTS, CANARY = (
    PREFIX + name for name in ("versions", "current", "epoch", "events", "canary")
)
STATES = ("ready", "current", "retired", "failed", "rejected")
SWITCHES = ("init", "promote", "rollback", "restore")  # the events that change the current version

# KEYS: current, epoch, events, target hash, prefix of version hashes (as KEYS[5], used to name the old one), the
# canary (any change of the current version ends it: it compared its candidate with the old one).
# ARGV: expected current ('' for none), target version, action, who, why, time, the lowest epoch allowed minus one
# (the model store's: a registry behind it must not hand out an epoch servers have already seen).
SWITCH_LUA = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return {'conflict', current} end
local state = redis.call('HGET', KEYS[4], 'state')
if not state then return {'unknown', ''} end
if state ~= 'ready' and state ~= 'retired' then return {'not_ready', state} end
if current ~= '' then redis.call('HSET', KEYS[5] .. current, 'state', 'retired') end
redis.call('HSET', KEYS[4], 'state', 'current')
redis.call('SET', KEYS[1], ARGV[2])
local epoch = redis.call('INCR', KEYS[2])
if epoch <= tonumber(ARGV[7]) then
  epoch = tonumber(ARGV[7]) + 1
  redis.call('SET', KEYS[2], epoch)
end
local candidate = redis.call('HGET', KEYS[6], 'version')
if candidate then
  redis.call('DEL', KEYS[6])
  local outcome = 'ended: the current version changed'
  if candidate == ARGV[2] then outcome = 'promoted' end
  redis.call('XADD', KEYS[3], '*', 'epoch', epoch, 'action', 'canary_stop', 'version', candidate,
    'previous', current, 'who', ARGV[4], 'why', outcome, 'time', ARGV[6])
end
local id = redis.call('XADD', KEYS[3], '*', 'epoch', epoch, 'action', ARGV[3], 'version', ARGV[2],
  'previous', current, 'who', ARGV[4], 'why', ARGV[5], 'time', ARGV[6])
return {'ok', tostring(epoch), id}
"""


# A registry behind the model store (a Redis restarted empty, or one that lost its last writes) takes the store's
# current version back, at an epoch above both its own and the store's, so that no epoch ever goes backwards.
# KEYS: current, epoch, events, target hash, prefix of version hashes, the canary (ended: it compared its candidate
# with a version the registry had lost). ARGV: version, store epoch, who, why, time.
RESTORE_LUA = """
local current = redis.call('GET', KEYS[1]) or ''
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
if epoch >= tonumber(ARGV[2]) and current ~= '' then return {'current', current} end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'unknown', ''} end
if current ~= '' and current ~= ARGV[1] then redis.call('HSET', KEYS[5] .. current, 'state', 'retired') end
redis.call('HSET', KEYS[4], 'state', 'current')
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[6])
epoch = math.max(epoch, tonumber(ARGV[2])) + 1
redis.call('SET', KEYS[2], epoch)
local id = redis.call('XADD', KEYS[3], '*', 'epoch', epoch, 'action', 'restore', 'version', ARGV[1],
  'previous', current, 'who', ARGV[3], 'why', ARGV[4], 'time', ARGV[5])
return {'ok', tostring(epoch), id}
"""

# KEYS: the version hash, the ordered set. ARGV: version, score, then field/value pairs. Atomic: never half a version.
REGISTER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


class RegistryError(RuntimeError):
    """A registry operation refused; the message says why and what to do."""


class Conflict(RegistryError):
    """The current version is not the one the caller expected: someone else changed it first."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    state: str
    parent: str | None
    made_by: str
    created: float
    card: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class Event:
    id: str
    epoch: int
    action: str
    version: str
    previous: str | None
    who: str
    why: str
    time: float


def version_key(version: str) -> str:
    """The hash of one version (the switch script writes it too)."""
    return f"{PREFIX}version:{version}"


ERROR_CHARS = 2000  # a failed version's error as kept: enough for a traceback's last lines


class Registry:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._switch = redis.register_script(SWITCH_LUA)
        self._register = redis.register_script(REGISTER_LUA)
        self._restore = redis.register_script(RESTORE_LUA)

    def register(self, version: str, parent: str | None, made_by: str, created: float, card: dict[str, Any]) -> bool:
        """Add a version as `ready`; False (and no change) when it is already registered."""
        fields: dict[str, str] = {
            "state": "ready",
            "parent": parent or "",
            "made_by": made_by,
            "created": repr(created),
            "card": json.dumps(finite(card)),
            "error": "",
        }
        number = int("".join(c for c in version if c.isdigit()) or 0)
        pairs: list[str] = [item for field in fields.items() for item in field]
        return bool(self._register(keys=[version_key(version), VERSIONS], args=[version, number, *pairs]))

    def show(self, version: str) -> VersionInfo:
        raw = {as_text(k): as_text(v) for k, v in self.redis.hgetall(version_key(version)).items()}
        if not raw:
            raise RegistryError(f"version {version} is not registered (see `rankloop versions`)")
        return VersionInfo(
            version,
            raw["state"],
            raw.get("parent") or None,
            raw.get("made_by", ""),
            float(raw.get("created", 0)),
            json.loads(raw.get("card") or "{}"),
            raw.get("error") or None,
        )

    def versions(self) -> list[VersionInfo]:
        return [self.show(as_text(v)) for v in self.redis.zrange(VERSIONS, 0, -1)]

    def current(self) -> tuple[str | None, int]:
        """(current version, epoch), read together."""
        current, epoch = self.redis.mget(CURRENT, EPOCH)
        return (as_text(current) if current else None), int(epoch or 0)

    def switch(self, target: str, expected: str | None, action: str, who: str, why: str, above_epoch: int = 0) -> int:
        """Make `target` current if `expected` still is; return the new epoch, above `above_epoch` too. Raises
        Conflict or RegistryError."""
        reply = self._switch(
            keys=[CURRENT, EPOCH, EVENTS, version_key(target), version_key(""), CANARY],
            args=[expected or "", target, action, who, why, time.time(), above_epoch],
        )
        status, detail = as_text(reply[0]), as_text(reply[1])
        if status == "conflict":
            raise Conflict(
                f"the current version is {detail or 'none'}, not {expected or 'none'}: someone changed it "
                "first; look at `rankloop versions` and try again"
            )
        if status == "unknown":
            raise RegistryError(f"version {target} is not registered (see `rankloop versions`)")
        if status == "not_ready":
            raise RegistryError(f"version {target} is {detail}, not ready: it cannot be made current")
        return int(detail)

    def restore(self, version: str, store_epoch: int, who: str, why: str) -> int | None:
        """Make `version` current again at an epoch above the registry's and `store_epoch`, where the registry has
        no current version or an epoch below `store_epoch` (it lost what the store kept); the new epoch, or None
        where the registry was not behind."""
        reply = self._restore(
            keys=[CURRENT, EPOCH, EVENTS, version_key(version), version_key(""), CANARY],
            args=[version, store_epoch, who, why, time.time()],
        )
        status = as_text(reply[0])
        if status == "unknown":
            raise RegistryError(f"version {version} is not registered (see `rankloop versions`)")
        return int(as_text(reply[1])) if status == "ok" else None

    def mark_failed(self, version: str, error: str) -> None:
        self.redis.hset(version_key(version), mapping={"state": "failed", "error": error[:ERROR_CHARS]})

    def events(self, after: str = "-", count: int = 100) -> list[Event]:
        start = after if after == "-" else f"({after}"
        return [_event(i, f) for i, f in self._range(start, count)]

    def latest_events(self, count: int = 100) -> list[Event]:
        """The newest `count` events, oldest first."""
        entries: Any = self.redis.xrevrange(EVENTS, max="+", min="-", count=count)
        return [_event(i, f) for i, f in reversed(list(entries or []))]

    def _range(self, start: str = "-", count: int | None = None) -> list[tuple[Any, Any]]:
        entries: Any = self.redis.xrange(EVENTS, min=start, max="+", count=count)
        return list(entries or [])

    def previous_of(self, version: str) -> str | None:
        """The version that was current before `version` last became current."""
        for event_id, fields in reversed(self._range()):
            event = _event(event_id, fields)
            if event.version == version and event.action in SWITCHES:
                return event.previous
        return None


def _event(event_id: Any, fields: dict[Any, Any]) -> Event:
    f = {as_text(k): as_text(v) for k, v in fields.items()}
    return Event(
        as_text(event_id),
        int(f["epoch"]),
        f["action"],
        f["version"],
        f["previous"] or None,
        f["who"],
        f["why"],
        float(f["time"]),
    )


class AsyncRegistry:
    """What a server replica needs of the registry, on its event loop: the state to follow and a way to say that
    a version failed to load. The keys stay this module's alone."""

    def __init__(self, redis: AsyncRedis) -> None:
        self.redis = redis

    async def state(self) -> tuple[str | None, int, str]:
        """(current version, epoch, last event id), read in one transaction."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(CURRENT)
            pipe.get(EPOCH)
            pipe.xrevrange(EVENTS, count=1)
            current, epoch, last = await pipe.execute()
        return (as_text(current) if current else None), int(epoch or 0), (as_text(last[0][0]) if last else "0-0")

    async def wait_for_events(self, after: str, block_ms: int) -> str | None:
        """The id of the newest change after event `after`, waiting up to `block_ms` for one; None when none came."""
        reply: Any = await self.redis.xread({EVENTS: after}, block=block_ms, count=100)
        return as_text(reply[0][1][-1][0]) if reply else None

    async def mark_failed(self, version: str, error: str) -> None:
        await self.redis.hset(version_key(version), mapping={"state": "failed", "error": error[:ERROR_CHARS]})
