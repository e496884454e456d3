"""The canary in the registry: a candidate version whose answers some comparisons put beside the current version's,
so that people, not the reward model, judge it (feedback.leaderboard reads their rankings).

One canary at a time, in the registry's `canary` hash (version, share, split, started, who). Starting and stopping
are scripts that check and write in one step and append `canary_start` / `canary_stop` to the registry's events,
which servers follow. Any change of the current version ends the canary (deploy.registry's switch script): it
compared its candidate with a version that is no longer current. A candidate the leaderboard rules out is marked
`rejected`, which a promotion refuses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from deploy.model_store import ModelStore
from deploy.redis_server import as_text
from deploy.registry import CANARY, CURRENT, EPOCH, EVENTS, RegistryError, version_key

# KEYS: canary, current, epoch, events, the candidate's hash. ARGV: version, share, split, who, why, time, the
# current version the caller checked the candidate against ('' for none).
START_LUA = """
local current = redis.call('GET', KEYS[2]) or ''
if current == '' then return {'no_current', ''} end
if current ~= ARGV[7] then return {'changed', current} end
if current == ARGV[1] then return {'is_current', current} end
local running = redis.call('HGET', KEYS[1], 'version')
if running then return {'running', running} end
local state = redis.call('HGET', KEYS[5], 'state')
if not state then return {'unknown', ''} end
if state ~= 'ready' and state ~= 'retired' then return {'not_ready', state} end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'current', current, 'share', ARGV[2], 'split', ARGV[3],
  'started', ARGV[6], 'who', ARGV[4])
local epoch = redis.call('GET', KEYS[3]) or '0'
local id = redis.call('XADD', KEYS[4], '*', 'epoch', epoch, 'action', 'canary_start', 'version', ARGV[1],
  'previous', current, 'who', ARGV[4], 'why', ARGV[5], 'time', ARGV[6])
return {'ok', current, id}
"""

# KEYS: canary, epoch, events, prefix of version hashes. ARGV: expected candidate, outcome (stopped or rejected),
# who, why, time.
STOP_LUA = """
local running = redis.call('HGET', KEYS[1], 'version')
if not running then return {'none', ''} end
if ARGV[1] ~= '' and running ~= ARGV[1] then return {'other', running} end
local current = redis.call('HGET', KEYS[1], 'current')
redis.call('DEL', KEYS[1])
if ARGV[2] == 'rejected' then redis.call('HSET', KEYS[4] .. running, 'state', 'rejected') end
local epoch = redis.call('GET', KEYS[2]) or '0'
redis.call('XADD', KEYS[3], '*', 'epoch', epoch, 'action', 'canary_stop', 'version', running,
  'previous', current, 'who', ARGV[3], 'why', ARGV[2] .. ': ' .. ARGV[4], 'time', ARGV[5])
return {'ok', running}
"""


NO_ADAPTERS = "servers answer with one version at a time unless RANKLOOP_SERVE_ADAPTERS=true: no canary can run"


@dataclass(frozen=True)
class Canary:
    version: str  # the candidate
    current: str  # the version it is judged against (the current one when it started)
    share: float  # of comparisons that mix the two
    split: int  # of a mixed comparison's K answers, how many the candidate writes
    started: float
    who: str


def base_of(store: ModelStore, version: str) -> str:
    """The full-weight version whose weights serve `version`: its adapter's base, or itself."""
    adapter = store.card(version).details.get("adapter")
    return str(adapter["base"]) if adapter else version


class Canaries:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._start = redis.register_script(START_LUA)
        self._stop = redis.register_script(STOP_LUA)

    def start(self, store: ModelStore, version: str, share: float, split: int, who: str, why: str = "") -> Canary:
        """Start judging `version` beside the current one; raises RegistryError with what to do."""
        if not 0.0 < share <= 1.0:
            raise RegistryError(f"--share {share}: give the share of comparisons to mix, above 0 and at most 1")
        if split < 1:
            raise RegistryError(f"--split {split}: the candidate writes at least 1 answer of a mixed comparison")
        raw = self.redis.get(CURRENT)
        current = as_text(raw) if raw is not None else ""
        if current and version in store.versions():
            # One engine serves both only as adapters of one base (or one of them the base itself).
            theirs, ours = base_of(store, version), base_of(store, current)
            if theirs != ours:
                raise RegistryError(
                    f"{version} runs on {theirs}'s weights and {current} on {ours}'s: a server cannot answer "
                    "with both at once; promote it, or train the candidate from the current version"
                )
        now = time.time()
        reply = self._start(
            keys=[CANARY, CURRENT, EPOCH, EVENTS, version_key(version)],
            args=[version, share, split, who, why, now, current],
        )
        status, detail = as_text(reply[0]), as_text(reply[1])
        if status == "ok":
            return Canary(version, detail, share, split, now, who)
        raise RegistryError(_refusal(status, detail, version))

    def stop(self, who: str, why: str = "", expected: str | None = None, rejected: bool = False) -> str:
        """End the running canary (the candidate `expected`, where given); with `rejected`, mark the candidate so.
        Returns the candidate."""
        outcome = "rejected" if rejected else "stopped"
        reply = self._stop(
            keys=[CANARY, EPOCH, EVENTS, version_key("")], args=[expected or "", outcome, who, why, time.time()]
        )
        status, detail = as_text(reply[0]), as_text(reply[1])
        if status == "none":
            raise RegistryError("no canary is running (see `rankloop canary status`)")
        if status == "other":
            raise RegistryError(f"the running canary is {detail}, not {expected}")
        return detail

    def running(self) -> Canary | None:
        return canary_of(self.redis.hgetall(CANARY))


def _refusal(status: str, detail: str, version: str) -> str:
    return {
        "no_current": "no version is current yet: a canary compares a candidate with the current version",
        "changed": f"the current version changed to {detail} meanwhile: look at `rankloop versions` and try again",
        "is_current": f"{version} is the current version already",
        "running": f"a canary of {detail} is running: stop it first (`rankloop canary stop`)",
        "unknown": f"version {version} is not registered (see `rankloop versions`)",
        "not_ready": f"version {version} is {detail}, not ready: it cannot be a canary",
    }[status]


def canary_of(raw: dict[Any, Any]) -> Canary | None:
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    if not fields:
        return None
    return Canary(
        fields["version"],
        fields["current"],
        float(fields["share"]),
        int(fields["split"]),
        float(fields["started"]),
        fields["who"],
    )


async def running_canary(redis: AsyncRedis) -> Canary | None:
    """The running canary, for a server's event loop."""
    return canary_of(await redis.hgetall(CANARY))
