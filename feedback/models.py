"""Bodies of the feedback API (the events it appends are feedback.events)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.protocol import MAX_MESSAGES, WHOLE_TEXT, ChatMessage

# Comparison ids are ours ("chatcmpl-<hex>"); the pattern also keeps Redis key names unambiguous.
ComparisonId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
MAX_ANSWER_CHARS = 32_768
UserId = Annotated[str, Field(min_length=1, max_length=256), WHOLE_TEXT]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=256), WHOLE_TEXT]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeedbackRequest(_Strict):
    comparison_id: ComparisonId
    ranking: Annotated[list[int | list[int]], Field(min_length=1, max_length=64)]
    user: UserId | None = None
    idempotency_key: IdempotencyKey | None = None

    @field_validator("ranking", mode="before")
    @classmethod
    def _indices_only(cls, value: Any) -> Any:
        # Strict, with one message: "1", 1.0 or true as an index is a client bug to report, not to coerce.
        if isinstance(value, list):
            for position, entry in enumerate(value):
                for index in entry if isinstance(entry, list) else [entry]:
                    if not _is_index(index):
                        raise ValueError(
                            f"entry {position} holds {json.dumps(index)}; a ranking lists candidate indices "
                            "(integers) best first, with ties as lists, e.g. [2, [0, 3], 1]"
                        )
        return value


class DemonstrationRequest(_Strict):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    comparison_id: ComparisonId | None = None
    answer: Annotated[str, Field(min_length=1, max_length=MAX_ANSWER_CHARS), WHOLE_TEXT]
    user: UserId | None = None
    idempotency_key: IdempotencyKey | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> DemonstrationRequest:
        if (self.messages is None) == (self.comparison_id is None):
            raise ValueError("give either 'messages' (the conversation) or 'comparison_id' (a served prompt)")
        if not self.answer.strip():
            raise ValueError("'answer' is blank; write the ideal assistant answer")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user': a demonstration answers the user's turn")
        return self


class Accepted(BaseModel):
    id: str = Field(description="the event id in the feedback stream")
    duplicate: bool = Field(description="true when this is a retry of an event already accepted")
    kind: Literal["ranking", "demonstration"]
    comparison_id: str | None = None
    pairs: int | None = Field(default=None, description="(chosen, rejected) pairs the ranking implies")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fingerprint(*parts: Any) -> str:
    """A stable digest of what a user submitted: equal submissions, equal digests."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
