"""The one contract for what crosses from the server to the learner: the comparison a server stores, and the
ranking and demonstration events the feedback stream carries into the dataset.

Every event is written by a function here and read back by `read_event` as a typed object. A ranking event embeds
its comparison verbatim (`ranking_head` is the event's JSON up to it; the append script adds the comparison's
stored JSON inside Redis without decoding it). `schema_version` names the contract an event was written under;
events stored before the field existed are version 1, which this module still reads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from feedback.ranking import Tiers

SCHEMA_VERSION: Literal[1] = 1
EventKind = Literal["ranking", "demonstration"]


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
    sampling: dict[str, Any] = Field(default_factory=dict)  # empty in comparisons stored before it was kept
    asker: str | None = None  # the API key's name that asked (RANKLOOP_AUTH=keys); None: open, or stored before


class RankingEvent(BaseModel):
    """Everything the learner needs, so it never reads the comparison (which expires) again."""

    kind: Literal["ranking"] = "ranking"
    schema_version: Literal[1] = SCHEMA_VERSION
    ranking: Tiers
    user: str | None
    created: float = Field(description="unix time the ranking was accepted")
    comparison: Comparison


class DemonstrationEvent(BaseModel):
    kind: Literal["demonstration"] = "demonstration"
    schema_version: Literal[1] = SCHEMA_VERSION
    messages: list[dict[str, Any]]
    answer: str
    user: str | None
    comparison_id: str | None
    policy_version: str | None
    created: float

    def conversation(self) -> list[dict[str, Any]]:
        """The prompt's messages with the demonstrated answer as the assistant's turn."""
        return [*self.messages, {"role": "assistant", "content": self.answer}]


FeedbackEvent = Annotated[RankingEvent | DemonstrationEvent, Field(discriminator="kind")]
_EVENT: TypeAdapter[RankingEvent | DemonstrationEvent] = TypeAdapter(FeedbackEvent)


class EventError(ValueError):
    """An event that does not follow the contract: never stored among the events, which every reader trusts."""


def ranking_head(ranking: Tiers, user: str | None, created: float) -> str:
    """A ranking event's JSON up to its comparison, ready for the comparison's stored JSON and a closing brace."""
    head = RankingEvent.model_construct(ranking=ranking, user=user, created=created)
    # The dump of every field but `comparison`, its closing brace replaced by the key the comparison goes under.
    return head.model_dump_json(exclude={"comparison"})[:-1] + ',"comparison":'


def read_event(event_id: str, kind: str, data: str | bytes) -> RankingEvent | DemonstrationEvent:
    """The typed event of a stored or streamed entry; `EventError` names the entry and what is wrong with it."""
    try:
        event = _EVENT.validate_json(data)
    except ValueError as exc:
        raise EventError(f"event {event_id} is not a valid {kind} event: {exc}") from exc
    if event.kind != kind:
        raise EventError(f"event {event_id} is filed as {kind} but holds a {event.kind} event")
    return event


def about(event: RankingEvent | DemonstrationEvent) -> tuple[str | None, str | None]:
    """(comparison id, policy version) an event is about, the dataset's index columns."""
    if isinstance(event, RankingEvent):
        return event.comparison.id, event.comparison.policy_version
    return event.comparison_id, event.policy_version
