"""Quotas: token buckets in Redis, per API key (or, without one, per client address), for chat requests, generated
tokens, rankings and demonstrations. Over a quota: 429 with `Retry-After`, and nothing recorded.

Every server replica shares the buckets (they live in Redis) and Redis's clock (the script reads TIME), so N
replicas do not make N times the quota. Loopback clients are not counted by address: they are this machine's own
(`make run`, `rankloop simulate`, the benchmarks); a key is counted wherever it comes from.

Generated tokens are known only once an answer is written: a request may start while its buckets hold any tokens,
and its answer's tokens are then charged in full, so a bucket can go into debt that the next requests wait out.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from fastapi import Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import ApiError, redis_unavailable
from deploy.auth import is_loopback
from deploy.settings import Settings

PREFIX = "rankloop:quota:"
# KEYS: buckets. ARGV: for each bucket, its rate (tokens a second), its size, and the cost now. A bucket is a hash
# {tokens, at} (at: milliseconds). Either every bucket pays its cost, or none does and the reply is the longest
# wait in milliseconds until all could, and the bucket that waits longest. A cost of 0 asks only that the bucket
# not be in debt; a negative cost charges -cost without checking (the tokens of an answer already written). A key
# lives until its bucket would be full again (debt included), so that an expiry never forgives what is owed.
TAKE_LUA = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local levels, wait, worst = {}, 0, 0
for i = 1, #KEYS do
  local rate, size, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local held = redis.call('HMGET', KEYS[i], 'tokens', 'at')
  local tokens = size
  if held[1] then tokens = math.min(size, tonumber(held[1]) + (ms - tonumber(held[2])) * rate / 1000) end
  levels[i] = tokens
  local need = cost
  if cost == 0 then need = 1e-9 end
  if cost >= 0 and tokens < need then
    local this = math.ceil((need - tokens) * 1000 / rate)
    if this > wait then wait, worst = this, i end
  end
end
if wait > 0 then return {wait, worst} end
for i = 1, #KEYS do
  local rate, size, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), math.abs(tonumber(ARGV[3*i]))
  redis.call('HSET', KEYS[i], 'tokens', tostring(levels[i] - cost), 'at', ms)
  redis.call('PEXPIRE', KEYS[i], math.ceil((size - (levels[i] - cost)) * 1000 / rate) + 1000)
end
return {0, 0}
"""


NAMES = {
    "chat": "chat requests",
    "tokens": "generated tokens",
    "ranking": "rankings",
    "demonstration": "demonstrations",
}


@dataclass(frozen=True)
class Limit:
    per_minute: int  # 0: no quota

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


class Quotas:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.limits = {
            "chat": Limit(settings.quota_chat_per_minute),
            "tokens": Limit(settings.quota_tokens_per_minute),
            "ranking": Limit(settings.quota_rankings_per_minute),
            "demonstration": Limit(settings.quota_demonstrations_per_minute),
        }
        self._take = redis.register_script(TAKE_LUA)

    async def take_for(self, request: Request, key_name: str | None, costs: dict[str, int]) -> None:
        """`take` from an HTTP request's holders."""
        await self.take(self.holders_of(request, key_name), costs)

    def holders_of(self, request: Request, key_name: str | None) -> list[str]:
        """`holders` of an HTTP request: its key's name, else the address it came from."""
        return self.holders(key_name, request.client.host if request.client is not None else None)

    @staticmethod
    def holders(key_name: str | None, address: str | None) -> list[str]:
        """Whose buckets a request draws on: its key's; without a key, its address's unless that is this machine.
        Why not both: every user behind one NAT or proxy would share the address's quota. An IPv6 client counts
        by its /64 (one host is given a whole /64, and would otherwise have a bucket per address it picks)."""
        if key_name is not None:
            return [f"key:{key_name}"]
        if address is None or is_loopback(address):
            return []
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return [f"ip:{address}"]
        network = ipaddress.ip_network(f"{ip}/64", strict=False) if ip.version == 6 else ip
        return [f"ip:{network}"]

    async def take(self, holders: list[str], costs: dict[str, int]) -> None:
        """Pay `costs` (kind → amount; 0: only not in debt; negative: charge without checking) from every holder's
        buckets, or raise ApiError 429 saying when to retry."""
        keys: list[str] = []
        kinds: list[str] = []
        args: list[float] = []
        for kind, cost in costs.items():
            limit = self.limits[kind]
            if limit.per_minute == 0:
                continue
            for holder in holders:
                keys.append(f"{PREFIX}{kind}:{holder}")
                kinds.append(kind)
                args += [limit.rate, limit.per_minute, cost]
        if not keys:
            return
        try:
            wait_ms, worst = (int(x) for x in await self._take(keys=keys, args=args))
        except RedisError as exc:
            raise redis_unavailable("quotas") from exc
        if wait_ms > 0:
            kind = kinds[worst - 1]
            seconds = max(1, math.ceil(wait_ms / 1000))
            raise ApiError(
                429,
                f"over the quota of {self.limits[kind].per_minute} {NAMES[kind]} a minute; retry in {seconds} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(seconds)},
            )
