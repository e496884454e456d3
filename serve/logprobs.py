"""Answer tokens' log-probabilities in OpenAI's shape (`logprobs.content`), from what the engine reported."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from api.protocol import ChoiceLogprobs, TokenLogprob, TopLogprob
from serve.engine import Alternatives

FLOOR = -9999.0  # OpenAI's figure for a token the sampler could not pick (top-p cut it): JSON has no -inf


def _top(tokenizer: Any, token_id: int, logprob: float) -> TopLogprob:
    # A token decoded alone: byte-level BPE splits some characters over tokens, which then decode to U+FFFD.
    text = str(tokenizer.decode([token_id]))
    return TopLogprob(token=text, logprob=logprob if logprob > FLOOR else FLOOR, bytes=list(text.encode()))


def choice_logprobs(
    tokenizer: Any,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    alternatives: Sequence[Alternatives],
    top: int,
) -> ChoiceLogprobs:
    """`logprobs` of a choice (or of a stream chunk's tokens): each token with its log-probability and, where
    `top` > 0, the `top` most likely tokens at its position."""
    content = []
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=True)):
        sampled = _top(tokenizer, token_id, logprob)
        best = alternatives[i][:top] if top and i < len(alternatives) else []
        content.append(TokenLogprob(**sampled.model_dump(), top_logprobs=[_top(tokenizer, t, lp) for t, lp in best]))
    return ChoiceLogprobs(content=content)
