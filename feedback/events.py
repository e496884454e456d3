"""The one contract for what crosses from the server to the learner: the comparison a server stores, and the
comparison, ranking and demonstration entries the feedback stream carries into the dataset.

Every entry is written by a function here and read back by `read_event` as a typed object. Since schema 2 a
comparison crosses once: the append script streams it (`comparison_head` and its stored JSON, spliced inside Redis
without decoding it) just before its first ranking, and every ranking of it names it by id (`RankingRecord`), a few
hundred bytes instead of the whole comparison again. The dataset joins the two back into a `RankingEvent`, what the
learner reads. Entries stored under schema 1 (a ranking with its comparison embedded, and those from before
`schema_version` existed) still read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter

from feedback.ranking import Tiers

SCHEMA_VERSION: Literal[2] = 2
EventKind = Literal["ranking", "demonstration", "comparison"]


class StoredCandidate(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(description="log-probability of each sampled token, as the engine reported it")
    finish_reason: str | None
    # The version that wrote this answer where it is not the comparison's (a canary's mixed comparison); None: the
    # comparison's `policy_version`.
    policy_version: str | None = None


class Comparison(BaseModel):
    id: str
    messages: list[dict[str, Any]]
    prompt_token_ids: list[int]
    candidates: list[StoredCandidate]
    policy_version: str
    created: float
    sampling: dict[str, Any] = Field(default_factory=dict)  # empty in comparisons stored before it was kept
    asker: str | None = None  # the API key's name that asked (RANKLOOP_AUTH=keys); None: open, or stored before


class ComparisonEvent(BaseModel):
    """A comparison on the stream: written once, before its first ranking, however many users rank it."""

    kind: Literal["comparison"] = "comparison"
    schema_version: Literal[2] = SCHEMA_VERSION
    comparison: Comparison


class RankingRecord(BaseModel):
    """A ranking as the stream and the dataset keep it since schema 2: its comparison by id."""

    kind: Literal["ranking"] = "ranking"
    schema_version: Literal[2] = SCHEMA_VERSION
    ranking: Tiers
    user: str | None
    created: float = Field(description="unix time the ranking was accepted")
    comparison_id: str


class RankingEvent(BaseModel):
    """A ranking with its comparison: everything the learner needs, so it never reads the comparison (which
    expires in Redis) again. The dataset makes it of a `RankingRecord` and its `ComparisonEvent` (schema 2); under
    schema 1 it was stored so, the comparison embedded."""

    kind: Literal["ranking"] = "ranking"
    schema_version: Literal[1, 2] = 1
    ranking: Tiers
    user: str | None
    created: float = Field(description="unix time the ranking was accepted")
    comparison: Comparison


class DemonstrationEvent(BaseModel):
    kind: Literal["demonstration"] = "demonstration"
    schema_version: Literal[1, 2] = 1  # absent: stored before the field existed; writers give SCHEMA_VERSION
    messages: list[dict[str, Any]]
    answer: str
    user: str | None
    comparison_id: str | None
    policy_version: str | None
    created: float

    def conversation(self) -> list[dict[str, Any]]:
        """The prompt's messages with the demonstrated answer as the assistant's turn."""
        return [*self.messages, {"role": "assistant", "content": self.answer}]


def _shape(value: Any) -> str | None:
    """Which model an entry is: its `kind`, and for a ranking whether it embeds its comparison (schema 1)."""
    if isinstance(value, dict):
        kind, embedded = value.get("kind"), "comparison" in value and "comparison_id" not in value
    else:
        kind, embedded = getattr(value, "kind", None), isinstance(value, RankingEvent)
    return "embedded" if kind == "ranking" and embedded else kind


StoredEntry = RankingRecord | RankingEvent | DemonstrationEvent | ComparisonEvent
_ENTRY: TypeAdapter[StoredEntry] = TypeAdapter(
    Annotated[
        Annotated[RankingRecord, Tag("ranking")]
        | Annotated[RankingEvent, Tag("embedded")]
        | Annotated[DemonstrationEvent, Tag("demonstration")]
        | Annotated[ComparisonEvent, Tag("comparison")],
        Discriminator(
            _shape,
            custom_error_type="invalid_kind",
            custom_error_message="`kind` must be one of ranking, demonstration, comparison",
        ),
    ]
)


class EventError(ValueError):
    """An entry that does not follow the contract: never stored among the events, which every reader trusts."""


def comparison_head() -> str:
    """A comparison entry's JSON up to its comparison, ready for the comparison's stored JSON and a closing brace."""
    head = ComparisonEvent.model_construct()
    # The dump of every field but `comparison`, its closing brace replaced by the key the comparison goes under.
    return head.model_dump_json(exclude={"comparison"})[:-1] + ',"comparison":'


def read_event(event_id: str, kind: str, data: str | bytes) -> StoredEntry:
    """The typed entry of a stored or streamed one; `EventError` names the entry and what is wrong with it."""
    try:
        event = _ENTRY.validate_json(data)
    except ValueError as exc:
        raise EventError(f"event {event_id} is not a valid {kind} event: {exc}") from exc
    if event.kind != kind:
        raise EventError(f"event {event_id} is filed as {kind} but holds a {event.kind} event")
    return event


def joined(record: RankingRecord, comparison: Comparison) -> RankingEvent:
    """The ranking with its comparison, as the learner reads it."""
    if comparison.id != record.comparison_id:
        raise EventError(f"ranking of {record.comparison_id} joined with comparison {comparison.id}")
    return RankingEvent(
        schema_version=record.schema_version,
        ranking=record.ranking,
        user=record.user,
        created=record.created,
        comparison=comparison,
    )


def about(event: RankingRecord | RankingEvent | DemonstrationEvent) -> tuple[str | None, str | None]:
    """(comparison id, policy version) an event is about, the dataset's index columns; a ranking record's
    version is its comparison's (None here: the dataset looks it up)."""
    if isinstance(event, RankingEvent):
        return event.comparison.id, event.comparison.policy_version
    if isinstance(event, RankingRecord):
        return event.comparison_id, None
    return event.comparison_id, event.policy_version
