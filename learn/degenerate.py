"""Answers no reward can buy back: empty ones and loops. Pure functions over an answer's text and token ids.

A policy trained against a reward model finds what that model never saw: the served version never wrote an empty
answer, so no ranking ever punished one, and a reward model may score it high. These checks do not ask any
model; the promotion gate (learn.gate) refuses a version whose share of such answers rose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LOOP_NGRAM = 4  # a loop repeats a run of this many tokens ...
LOOP_SHARE = 0.5  # ... so often that at least this share of the answer's n-grams are repeats of earlier ones
LOOP_MIN_TOKENS = 12  # shorter answers are too short to tell a loop from a list


def is_empty(text: str) -> bool:
    return not text.strip()


def repeated_share(tokens: Sequence[int], n: int = LOOP_NGRAM) -> float:
    """Share of the answer's n-grams that already occurred earlier in it (0 for answers shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def is_loop(tokens: Sequence[int]) -> bool:
    return len(tokens) >= LOOP_MIN_TOKENS and repeated_share(tokens) >= LOOP_SHARE


def kind(text: str, tokens: Sequence[int]) -> str | None:
    """`empty`, `loop`, or None for an answer that is neither."""
    if is_empty(text):
        return "empty"
    if is_loop(tokens):
        return "loop"
    return None


@dataclass(frozen=True)
class Shares:
    """Shares of a set of answers: empty, degenerate (empty or a loop), and cut by the length limit."""

    empty: float
    degenerate: float
    truncated: float


def shares(texts: Sequence[str], tokens: Sequence[Sequence[int]], truncated: Sequence[bool]) -> Shares:
    n = len(texts)
    if n == 0:
        return Shares(0.0, 0.0, 0.0)
    kinds = [kind(text, ids) for text, ids in zip(texts, tokens, strict=True)]
    return Shares(kinds.count("empty") / n, sum(k is not None for k in kinds) / n, sum(truncated) / n)
