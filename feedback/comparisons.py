"""Comparisons: the K candidate answers of one prompt, kept in Redis until users rank them.

A comparison is written once, when its last candidate is complete, as one JSON value with a TTL; the
feedback API reads it back to build a self-contained ranking event.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

KEY_PREFIX = "rankloop:comparison:"


class StoredCandidate(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(description="log-probability of each sampled token, as the engine reported it")
    finish_reason: str | None


class Comparison(BaseModel):
    id: str
    messages: list[dict[str, Any]]
    prompt_token_ids: list[int]
    candidates: list[StoredCandidate]
    policy_version: str
    created: float
    sampling: dict[str, Any] = Field(default_factory=dict)


class ComparisonStore:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    @staticmethod
    def key(comparison_id: str) -> str:
        return KEY_PREFIX + comparison_id

    async def put(self, comparison: Comparison) -> None:
        # NX: an id is never reused, so an existing key means a bug, and overwriting it would change
        # what users already ranked.
        written = await self.redis.set(self.key(comparison.id), comparison.model_dump_json(), ex=self.ttl_s, nx=True)
        if not written:
            raise KeyError(f"comparison {comparison.id} already exists")

    async def get(self, comparison_id: str) -> Comparison | None:
        raw = await self.redis.get(self.key(comparison_id))
        return None if raw is None else Comparison.model_validate_json(raw)
