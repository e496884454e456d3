"""The feedback stream: one atomic append per event, recognising retries by their claim keys.

An event is appended by a Lua script, so the check of its claim keys, the XADD and the writing of the keys
happen as one step: a crash or a dropped connection leaves either all of them or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

STREAM_KEY = "rankloop:feedback"
CLAIM_PREFIX = "rankloop:claim:"

# KEYS[1]: the stream; KEYS[2..]: claim keys. ARGV: ttl seconds, fingerprint, kind, event JSON.
# A claim key holds "<event id> <fingerprint>". Any key already held decides the outcome: the same
# fingerprint means a retry (answer with the original id), another one a conflict.
APPEND_LUA = """
for i = 2, #KEYS do
  local held = redis.call('GET', KEYS[i])
  if held then
    local sep = string.find(held, ' ', 1, true)
    local status = 'conflict'
    if string.sub(held, sep + 1) == ARGV[2] then status = 'duplicate' end
    return {string.sub(held, 1, sep - 1), status, KEYS[i]}
  end
end
local id = redis.call('XADD', KEYS[1], '*', 'kind', ARGV[3], 'data', ARGV[4])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], id .. ' ' .. ARGV[2], 'EX', ARGV[1])
end
return {id, 'new', ''}
"""

Outcome = Literal["new", "duplicate", "conflict"]


@dataclass(frozen=True)
class Appended:
    event_id: str
    outcome: Outcome
    claim: str  # the key that decided a duplicate or conflict; empty for a new event


class FeedbackStream:
    def __init__(self, redis: Redis, stream_key: str = STREAM_KEY) -> None:
        self.redis = redis
        self.stream_key = stream_key
        self._append = redis.register_script(APPEND_LUA)

    @staticmethod
    def claim_key(*parts: str) -> str:
        return CLAIM_PREFIX + ":".join(parts)

    async def append(self, kind: str, data: str, fingerprint: str, claims: list[str], ttl_s: int) -> Appended:
        """Append one event unless a claim key already holds one; see APPEND_LUA."""
        reply = await self._append(keys=[self.stream_key, *claims], args=[ttl_s, fingerprint, kind, data])
        event_id, outcome, claim = (as_text(part) for part in reply)
        assert outcome in ("new", "duplicate", "conflict"), outcome
        return Appended(event_id, outcome, claim)  # type: ignore[arg-type]


def as_text(value: bytes | str) -> str:
    """Redis replies are bytes unless the client decodes them; accept both."""
    return value.decode() if isinstance(value, bytes) else value
