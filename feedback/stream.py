"""The feedback stream: one atomic append per event, recognising retries by their claim keys.

An event is appended by a Lua script, so the check of its claim keys, the lookup of the comparison it ranks, the
XADD and the writing of the keys happen as one step: a crash or a dropped connection leaves all of them or none.

Appends made while batches are on the wire wait and go together in the next pipeline (each still its own atomic
script): on a busy server one round trip to Redis carries many rankings instead of one. A few pipelines may be on
the wire at once, so that this process works on new requests while Redis runs the scripts of earlier ones.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from deploy.redis_server import as_text
from feedback.events import comparison_head

STREAM_KEY = "rankloop:feedback"
CLAIM_PREFIX = "rankloop:claim:"

# KEYS[1]: the stream; KEYS[2 .. 1+n]: claim keys (n = ARGV[5]); KEYS[2+n], when present: the comparison a ranking
# ranks (a hash, see feedback.comparisons).
# ARGV: ttl seconds, fingerprint, kind, event JSON, n, the largest candidate index the event names, the name that
# must have asked for the comparison ("": anyone may rank it), the most rankings the comparison takes (0: no cap;
# its hash counts them in `rankings`), the most entries the stream may hold (0: no bound), and the head of a
# comparison entry (feedback.events.comparison_head).
# A claim key holds "<event id> <fingerprint>". A key already held decides: the same fingerprint means a retry
# (answer with the original id), another one a conflict. Claims are checked before the bound and the comparison,
# so a retry still gets its original id after the comparison expired or while the stream is full.
# A comparison's first ranking streams the comparison itself first (its JSON spliced in, never decoded here), and
# the hash remembers that entry's id in `streamed`: later rankings name the comparison and add nothing else.
APPEND_LUA = """
local nclaims = tonumber(ARGV[5])
for i = 2, 1 + nclaims do
  local held = redis.call('GET', KEYS[i])
  if held then
    local sep = string.find(held, ' ', 1, true)
    local status = 'conflict'
    if string.sub(held, sep + 1) == ARGV[2] then status = 'duplicate' end
    return {string.sub(held, 1, sep - 1), status, KEYS[i]}
  end
end
local bound = tonumber(ARGV[9])
if bound > 0 then
  local length = redis.call('XLEN', KEYS[1])
  if length >= bound then return {'', 'backlog', tostring(length)} end
end
if #KEYS > 1 + nclaims then
  local comparison = KEYS[#KEYS]
  local found = redis.call('HMGET', comparison, 'k', 'streamed', 'asker', 'rankings')
  if not found[1] then return {'', 'missing', ''} end
  if ARGV[7] ~= '' and found[3] ~= ARGV[7] then return {'', 'not_asker', ''} end
  if tonumber(ARGV[6]) >= tonumber(found[1]) then return {'', 'out_of_range', found[1]} end
  local cap = tonumber(ARGV[8])
  if cap > 0 and tonumber(found[4] or '0') >= cap then return {'', 'full', ARGV[8]} end
  if cap > 0 then redis.call('HINCRBY', comparison, 'rankings', 1) end
  if not found[2] then
    local json = redis.call('HGET', comparison, 'json')
    local streamed = redis.call('XADD', KEYS[1], '*', 'kind', 'comparison', 'data', ARGV[10] .. json .. '}')
    redis.call('HSET', comparison, 'streamed', streamed)
  end
end
local id = redis.call('XADD', KEYS[1], '*', 'kind', ARGV[3], 'data', ARGV[4])
for i = 2, 1 + nclaims do
  redis.call('SET', KEYS[i], id .. ' ' .. ARGV[2], 'EX', ARGV[1])
end
return {id, 'new', ''}
"""
MAX_IN_FLIGHT = 4
# Appends waiting for a pipeline at most: beyond, Redis is not keeping up (or not answering) and a new append is
# refused at once (a 503 to its client) instead of joining a queue that grows without end.
MAX_WAITING = 10_000
APPEND_SHA = hashlib.sha1(APPEND_LUA.encode()).hexdigest()
COMPARISON_HEAD = comparison_head()

Outcome = Literal["new", "duplicate", "conflict", "missing", "out_of_range", "not_asker", "full", "backlog"]


@dataclass(frozen=True)
class Appended:
    event_id: str  # empty when nothing was appended and no earlier event decided (missing, out_of_range)
    outcome: Outcome
    # the claim key behind a duplicate or conflict; the candidate count behind out_of_range; the stream's length
    # behind backlog
    detail: str


class Backlog(RedisError):
    """MAX_WAITING appends already wait for Redis."""


@dataclass
class _Call:
    keys: list[str]
    args: list[str | int]
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FeedbackStream:
    def __init__(
        self, redis: Redis, stream_key: str = STREAM_KEY, max_waiting: int = MAX_WAITING, max_backlog: int = 0
    ) -> None:
        """`max_backlog`: the most entries the stream holds (0: no bound). The consumer trims what it stored, so
        the stream holds what it has not stored yet: while it is down, appends are refused beyond the bound
        (outcome `backlog`) instead of filling Redis."""
        self.redis = redis
        self.stream_key = stream_key
        self.max_waiting = max_waiting
        self.max_backlog = max_backlog
        self._waiting: list[_Call] = []
        self._senders: set[asyncio.Task[None]] = set()

    @staticmethod
    def claim_key(*parts: str) -> str:
        return CLAIM_PREFIX + ":".join(parts)

    async def append(
        self,
        kind: str,
        data: str,
        fingerprint: str,
        claims: list[str],
        ttl_s: int,
        embed: str | None = None,
        max_index: int = -1,
        asker: str = "",
        cap: int = 0,
    ) -> Appended:
        """Append one event unless a claim key already holds one; see APPEND_LUA.

        With `embed` (a comparison key), the event ranks that comparison: it is appended after checking that the
        comparison exists, has more than `max_index` candidates and, where `asker` is given, was asked for by
        `asker`, and has had fewer than `cap` rankings (where `cap` > 0); the comparison itself goes on the stream
        just before its first ranking.
        """
        if len(self._waiting) >= self.max_waiting:
            raise Backlog(f"{len(self._waiting)} feedback events already wait for Redis")
        keys = [self.stream_key, *claims, *([embed] if embed else [])]
        args: list[str | int] = [ttl_s, fingerprint, kind, data, len(claims), max_index, asker, cap]
        args += [self.max_backlog, COMPARISON_HEAD]
        call = _Call(keys, args)
        self._waiting.append(call)
        if len(self._senders) < MAX_IN_FLIGHT:
            sender = asyncio.create_task(self._send())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        reply = await call.done
        event_id, outcome, detail = (as_text(part) for part in reply)
        return Appended(event_id, outcome, detail)  # type: ignore[arg-type]

    async def _send(self) -> None:
        """Send everything waiting as one pipeline, again until nothing waits; resolve each caller's future."""
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                replies = await self._evalsha(batch)
            except Exception as exc:  # the connection failed: every caller in the batch hears it
                replies = [exc] * len(batch)
            for call, reply in zip(batch, replies, strict=True):
                if call.done.done():  # the caller went away (client disconnected)
                    continue
                if isinstance(reply, BaseException):
                    call.done.set_exception(reply)
                else:
                    call.done.set_result(reply)

    async def _evalsha(self, batch: list[_Call]) -> list[Any]:
        replies: list[Any]
        if len(batch) == 1:  # a pipeline of one costs more than the plain command
            call = batch[0]
            try:
                replies = [await self.redis.evalsha(APPEND_SHA, len(call.keys), *call.keys, *call.args)]
            except NoScriptError as exc:
                replies = [exc]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for call in batch:
                pipe.execute_command("EVALSHA", APPEND_SHA, len(call.keys), *call.keys, *call.args)
            replies = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis restarted (scripts are not persisted): load the script and run those calls again. A call
            # refused with NOSCRIPT did nothing, so running it again cannot append twice.
            await self.redis.script_load(APPEND_LUA)
            again = [c for c, r in zip(batch, replies, strict=True) if isinstance(r, NoScriptError)]
            retried = iter(await self._evalsha(again))
            replies = [next(retried) if isinstance(r, NoScriptError) else r for r in replies]
        return replies
