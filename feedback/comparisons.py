"""Comparisons: the K candidate answers of one prompt, kept in Redis until users rank them.

A comparison is written once, when its last candidate is complete, as a hash with a TTL: `json` (the whole
comparison), `k` (its number of candidates) and `asker` (the API key's name that asked, empty when open). The
feedback append script embeds `json` in the ranking event verbatim, checks indices against `k` and the ranker
against `asker`, without decoding the JSON inside Redis (that would cost ~25x more).
"""

from __future__ import annotations

from redis.asyncio import Redis

from feedback.events import Comparison

KEY_PREFIX = "rankloop:comparison:"
# NX by hand: an id is never reused, so an existing key means a bug, and overwriting it would change what users
# already ranked.
PUT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'json', ARGV[1], 'k', ARGV[2], 'asker', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class ComparisonStore:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._put = redis.register_script(PUT_LUA)

    @staticmethod
    def key(comparison_id: str) -> str:
        return KEY_PREFIX + comparison_id

    async def put(self, comparison: Comparison) -> None:
        raw = comparison.model_dump_json()
        written = await self._put(
            keys=[self.key(comparison.id)], args=[raw, len(comparison.candidates), self.ttl_s, comparison.asker or ""]
        )
        if not written:
            raise KeyError(f"comparison {comparison.id} already exists")

    async def get(self, comparison_id: str) -> Comparison | None:
        raw = await self.redis.hget(self.key(comparison_id), "json")
        return None if raw is None else Comparison.model_validate_json(raw)
