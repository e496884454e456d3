"""Request and response bodies of the HTTP API: OpenAI's chat-completions shape plus `policy_version`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 65_536  # per message: far beyond any context rankloop serves, far below the body limit
MAX_PARTS = 64  # text parts per message
MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs

_SURROGATE = re.compile("[\ud800-\udfff]")


def _whole_text(value: Any) -> Any:
    """Refuse text with a lone surrogate (JSON lets a client write "\\ud800" alone; no UTF-8 encodes it, so the
    tokenizer, Redis or SQLite would fail on it later, or pydantic would refuse it with a message that names no
    cause). Runs before pydantic's own string check, so every field says the same thing."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            raise ValueError(
                f"holds a lone surrogate (U+{ord(found.group()):04X} at character {found.start()}): send valid "
                "Unicode text (a character outside the BMP is written as a surrogate pair, e.g. \\ud83d\\ude00)"
            )
    return value


WHOLE_TEXT = BeforeValidator(_whole_text)
Text = Annotated[str, WHOLE_TEXT]


MAX_N = 9  # candidates a request may ask for (n)


class _Strict(BaseModel):
    # Unknown fields are refused by name rather than ignored: a misspelt `max_token` silently ignored
    # would produce answers of an unexpected length.
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]
    name: Annotated[str, Field(max_length=256), WHOLE_TEXT] | None = None

    @field_validator("content")
    @classmethod
    def _capped(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        size = len(content) if isinstance(content, str) else sum(len(part.text) for part in content)
        if size > MAX_CONTENT_CHARS:
            raise ValueError(f"the message holds {size} characters; a message may hold at most {MAX_CONTENT_CHARS}")
        return content

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchema(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    # `schema` is a BaseModel attribute: the field is named otherwise and keeps OpenAI's name on the wire.
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class ChatCompletionRequest(_Strict):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: str | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="vLLM extension: generate max_tokens tokens even past EOS")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256), WHOLE_TEXT] | None = None
    logprobs: bool = Field(False, description="Return each answer token's log-probability (OpenAI's shape).")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With `logprobs`: the most likely tokens at each position."
    )
    response_format: ResponseFormat | None = None
    # Named so that their refusal says why (the service checks the served model's chat template), rather than
    # "extra inputs are not permitted".
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must have role 'user': rankloop answers the user's turn")
        if not messages[-1].text().strip():
            raise ValueError("the last user message is empty")
        return messages

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # The engines fail on an empty stop string (a 500 on vLLM), and a long list slows every decoding step.
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"{len(stops)} stop sequences; give at most {MAX_STOP}")
        for text in stops:
            if not text:
                raise ValueError("a stop sequence is empty; leave it out or give its text")
            if len(text) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence has {len(text)} characters; each may have at most {MAX_STOP_CHARS}")
        return stop

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def top(self) -> int | None:
        """Alternatives per position to report: None, no log-probabilities; 0, the sampled token's only."""
        return (self.top_logprobs or 0) if self.logprobs else None


FinishReason = Literal["stop", "length", "abort"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # UTF-8 of `token` as decoded (a token inside a multi-byte character decodes to U+FFFD)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


WRITER = (
    "The version that wrote this answer (rankloop's extension): in a canary's comparisons some answers are the "
    "candidate version's. Given where the operator shows versions (RANKLOOP_WEB_SHOW_VERSIONS); null otherwise, so "
    "that rankers judge the answers, not their authors."
)


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None
    policy_version: str | None = Field(default=None, description=WRITER)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    policy_version: str


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    policy_version: str | None = Field(default=None, description=WRITER + " In a stream, on each choice's first chunk.")


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    policy_version: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rankloop"
    policy_version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
