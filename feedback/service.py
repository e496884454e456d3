"""Feedback intake: turn a ranking or a demonstration into one self-contained event on the stream.

Claims decide retries and conflicts (see feedback.stream):
- a ranking always claims (comparison, user): the same user ranking the same comparison again with the same
  order is a retry, with another order a conflict (409);
- a demonstration claims a digest of its content, so only an exact resubmission is a retry;
- an `idempotency_key` adds a claim of its own, so a client can make any retry safe.
"""

from __future__ import annotations

import time

from redis.exceptions import RedisError

from api.errors import ApiError, out_of_memory, redis_full
from api.metrics import ServeMetrics
from deploy.keys import KeyRecord
from feedback.comparisons import ComparisonStore
from feedback.events import SCHEMA_VERSION, DemonstrationEvent, RankingRecord
from feedback.models import Accepted, DemonstrationRequest, FeedbackRequest, fingerprint
from feedback.ranking import RankingError, out_of_range, pairs, to_tiers
from feedback.stream import Appended, FeedbackStream

REDIS_RETRY_AFTER_S = "5"
BACKLOG_RETRY_AFTER_S = "30"


class FeedbackService:
    def __init__(
        self,
        comparisons: ComparisonStore,
        stream: FeedbackStream,
        claim_ttl_s: int,
        metrics: ServeMetrics,
        max_rankings: int = 0,
    ) -> None:
        self.comparisons = comparisons
        self.stream = stream
        self.claim_ttl_s = claim_ttl_s
        self.metrics = metrics
        self.max_rankings = max_rankings  # per comparison; 0: no cap

    async def rank(self, request: FeedbackRequest, key: KeyRecord | None = None) -> Accepted:
        """Append a ranking; `key`, with RANKLOOP_AUTH=keys, names its user and limits what it may rank."""
        user, asker = _who(request.user, key)
        try:
            tiers = to_tiers(request.ranking, k=None)  # the upper bound is checked beside the comparison, in Redis
        except RankingError as exc:
            raise ApiError(400, str(exc), "ranking", "invalid_ranking") from exc
        top = max(index for tier in tiers for index in tier)
        record = RankingRecord(ranking=tiers, user=user, created=time.time(), comparison_id=request.comparison_id)
        digest = fingerprint(request.comparison_id, [sorted(tier) for tier in tiers], user)
        claims = [self.stream.claim_key("ranked", request.comparison_id, user or "")]
        embed = self.comparisons.key(request.comparison_id)
        owner = user if key is not None else None
        appended = await self._append(
            "ranking", record.model_dump_json(), digest, claims, request, embed, top, asker, owner
        )
        if appended.outcome == "missing":
            raise _unknown(request.comparison_id)
        if appended.outcome == "not_asker":
            raise _not_asker(request.comparison_id)
        if appended.outcome == "full":
            raise ApiError(
                409,
                f"comparison '{request.comparison_id}' already has {appended.detail} rankings, the most one "
                "comparison takes: ask for new answers to rank",
                "comparison_id",
                "comparison_full",
            )
        if appended.outcome == "out_of_range":
            raise ApiError(400, out_of_range(top, int(appended.detail)), "ranking", "invalid_ranking")
        return Accepted(
            id=appended.event_id,
            duplicate=appended.outcome == "duplicate",
            kind="ranking",
            comparison_id=request.comparison_id,
            pairs=len(pairs(tiers)),
        )

    async def demonstrate(self, request: DemonstrationRequest, key: KeyRecord | None = None) -> Accepted:
        user, asker = _who(request.user, key)
        try:
            event = await self._demonstration_event(request, user, asker)
        except RedisError as exc:
            raise _redis_down() from exc
        digest = fingerprint(event.messages, event.answer, event.user)
        claims = [self.stream.claim_key("demo", digest)]
        owner = user if key is not None else None
        appended = await self._append("demonstration", event.model_dump_json(), digest, claims, request, owner=owner)
        return Accepted(
            id=appended.event_id,
            duplicate=appended.outcome == "duplicate",
            kind="demonstration",
            comparison_id=request.comparison_id,
        )

    async def _append(
        self,
        kind: str,
        data: str,
        digest: str,
        claims: list[str],
        request: FeedbackRequest | DemonstrationRequest,
        embed: str | None = None,
        top: int = -1,
        asker: str = "",
        owner: str | None = None,
    ) -> Appended:
        """Append through the stream; `owner`, an API key's name, keeps its idempotency keys apart from others'
        (a key holder must not be able to take, or learn of, another's)."""
        key = request.idempotency_key
        idempotency = None
        if key is not None:
            # The client's key is checked first: reusing it for another body is the client's error to hear about.
            idempotency = (
                self.stream.claim_key("key", key) if owner is None else self.stream.claim_key("key", owner, key)
            )
            claims = [idempotency, *claims]
        try:
            cap = self.max_rankings if kind == "ranking" else 0
            appended = await self.stream.append(kind, data, digest, claims, self.claim_ttl_s, embed, top, asker, cap)
        except RedisError as exc:
            raise redis_full(f"the {kind}") if out_of_memory(exc) else _redis_down() from exc
        self.metrics.feedback.labels(kind, appended.outcome).inc()
        if appended.outcome == "conflict":
            raise _conflict(appended, key if appended.detail == idempotency else None)
        if appended.outcome == "backlog":
            raise _backlog(int(appended.detail))
        return appended

    async def _demonstration_event(
        self, request: DemonstrationRequest, user: str | None, asker: str
    ) -> DemonstrationEvent:
        if request.comparison_id is not None:
            comparison = await self.comparisons.get(request.comparison_id)
            if comparison is None:
                raise _unknown(request.comparison_id)
            if asker and comparison.asker != asker:
                raise _not_asker(request.comparison_id)
            messages, version = comparison.messages, comparison.policy_version
        else:
            assert request.messages is not None  # the model validator allows exactly one of the two
            messages, version = [{"role": m.role, "content": m.text()} for m in request.messages], None
        return DemonstrationEvent(
            schema_version=SCHEMA_VERSION,
            messages=messages,
            answer=request.answer,
            user=user,
            comparison_id=request.comparison_id,
            policy_version=version,
            created=time.time(),
        )


def _who(said: str | None, key: KeyRecord | None) -> tuple[str | None, str]:
    """(the event's user, the name that must have asked for the comparison: "" for anyone). With a key, the user is
    the key's name, and a `user` key may only rank or demonstrate on what it asked for itself."""
    if key is None:
        return said, ""
    if said is not None and said != key.name:
        raise ApiError(
            403,
            f"`user` is '{said}', but the API key is {key.name}'s: leave `user` out (the key names the user) "
            f"or send '{key.name}'",
            "user",
            "user_mismatch",
        )
    return key.name, "" if key.may("rater") else key.name


def _not_asker(comparison_id: str) -> ApiError:
    return ApiError(
        403,
        f"comparison '{comparison_id}' was asked for by another user: only its asker, or a key of the rater role, "
        "may rank it or write a demonstration for it",
        "comparison_id",
        "not_your_comparison",
    )


def _unknown(comparison_id: str) -> ApiError:
    return ApiError(
        404,
        f"comparison '{comparison_id}' is unknown or has expired; rank the `id` of a recent chat completion "
        "that had n >= 2",
        "comparison_id",
        "comparison_not_found",
    )


def _conflict(appended: Appended, key: str | None) -> ApiError:
    """409: `key`, the idempotency key when its claim was the one already held; else the ranking's."""
    if key is not None:
        message = f"idempotency_key '{key}' was already used for a different submission (event {appended.event_id})"
        return ApiError(409, message, "idempotency_key", "idempotency_key_reused")
    message = (
        f"this user already ranked this comparison differently (event {appended.event_id}); "
        "a ranking cannot be changed once accepted"
    )
    return ApiError(409, message, "ranking", "already_ranked")


def _backlog(length: int) -> ApiError:
    return ApiError(
        503,
        f"feedback is paused: {length} events wait in Redis for the learner's consumer to store them, the most it "
        "keeps; retry later. Operators: is the learner (or `rankloop feedback consume`) running? See "
        "`rankloop feedback stats`",
        code="feedback_backlog",
        headers={"Retry-After": BACKLOG_RETRY_AFTER_S},
    )


def _redis_down() -> ApiError:
    return ApiError(
        503,
        "feedback could not be confirmed as stored (Redis unavailable or not answering); retry shortly: the same "
        "feedback sent again is recognised and never counted twice",
        code="redis_unavailable",
        headers={"Retry-After": REDIS_RETRY_AFTER_S},
    )
