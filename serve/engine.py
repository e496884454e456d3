"""The small interface the HTTP service needs from an inference engine, and the types that cross it.

The service owns nothing of the engine's internals: it hands over prompt token ids and sampling
parameters and receives, per step, the new tokens of each candidate that advanced.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase


class EngineInputError(ValueError):
    """The engine refused a request for what it asked (a JSON schema its grammar compiler cannot take): the
    client's to fix, a 400."""


@dataclass(frozen=True)
class JsonOutput:
    """Answers constrained to JSON: a JSON object of any shape, or one that follows `schema`."""

    schema: dict[str, Any] | None = None


# Per answer token, its most likely alternatives: (token id, log-probability), most likely first.
Alternatives = list[tuple[int, float]]


@dataclass(frozen=True)
class AdapterRef:
    """A version served as a LoRA adapter on the weights the engine holds (learn.adapters wrote its folder)."""

    version: str
    folder: Path

    @property
    def number(self) -> int:
        """A positive id unique to the version (vLLM's LoRA id; 0 would mean none)."""
        return int("".join(c for c in self.version if c.isdigit()) or 0) + 1


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    stream: bool = True  # False: the engine may deliver each candidate whole, once, when it is done
    top_logprobs: int = 0  # alternatives per answer token to report (the sampled token's log-prob always is)
    json: JsonOutput | None = None
    adapter: AdapterRef | None = None  # None: the engine's own weights


@dataclass(frozen=True)
class CandidateDelta:
    """What one candidate gained in one engine step; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    top: list[Alternatives] = field(default_factory=list)  # per token where asked for (top_logprobs > 0)


@dataclass
class Candidate:
    """A whole answer, assembled from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    top: list[Alternatives] = field(default_factory=list)

    def add(self, delta: CandidateDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.top.extend(delta.top)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class Engine(Protocol):
    """What serve/ needs of an engine."""

    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    supports_json: bool  # can constrain answers to JSON (GenerationRequest.json)
    supports_adapters: bool  # can answer with a LoRA adapter on its weights (GenerationRequest.adapter)

    def generate(self, request: GenerationRequest) -> AsyncGenerator[list[CandidateDelta], None]:
        """Yield, per engine step, the deltas of the candidates that advanced. Cancelling it aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def unfinished(self) -> int:
        """Requests the engine is still working on (running or queued)."""
        ...

    async def healthy(self) -> bool: ...

    async def load_weights(self, folder: Path) -> None:
        """Replace the weights with those in `folder` (checked beforehand); called with no generation running."""
        ...

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load `adapter` now, so that the first answer with it does not wait for the load; raises where it cannot
        be served (files, rank). Generations keep running meanwhile."""
        ...

    async def shutdown(self) -> None: ...
