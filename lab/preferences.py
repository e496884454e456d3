"""Scripted preferences for simulated users: a scorer over (prompt, answer), and the ranking a user with that
preference (and some disagreement) gives K answers.

Built in: `concise` (shorter is better, empty is worst), `enthusiastic` (exclamation marks and positive words),
`keyword:WORD` (answers that use WORD); `module:function` loads any scorer with the same signature, so users can plug
in their own oracle or judge.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable, Sequence
from itertools import combinations

from feedback.ranking import Tiers

Scorer = Callable[[str, str], float]  # (prompt, answer) -> higher is preferred

POSITIVE_WORDS = frozenset(
    {
        "amazing",
        "awesome",
        "love",
        "lovely",
        "wonderful",
        "great",
        "fantastic",
        "excellent",
        "happy",
        "glad",
        "delighted",
        "brilliant",
        "exciting",
        "excited",
        "fun",
        "joy",
        "enjoy",
        "beautiful",
        "superb",
        "terrific",
        "thrilled",
    }
)
_WORD = re.compile(r"[a-z']+")


class PreferenceError(ValueError):
    """A preference name that names nothing; the message lists what exists."""


def concise(prompt: str, answer: str) -> float:
    text = answer.strip()
    return float("-inf") if not text else -float(len(text))


def enthusiastic(prompt: str, answer: str) -> float:
    words = _WORD.findall(answer.lower())
    return float(answer.count("!") + sum(w in POSITIVE_WORDS for w in words))


def keyword(word: str) -> Scorer:
    pattern = re.compile(rf"\b{re.escape(word.lower())}\b")

    def score(prompt: str, answer: str) -> float:
        return float(len(pattern.findall(answer.lower())))

    return score


BUILT_IN: dict[str, Scorer] = {"concise": concise, "enthusiastic": enthusiastic}


def load_scorer(name: str) -> Scorer:
    """`concise`, `enthusiastic`, `keyword:WORD`, or `package.module:function`."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    kind, _, argument = name.partition(":")
    if not kind.strip() or not argument.strip():
        raise PreferenceError(
            f"unknown preference {name!r}: use concise, enthusiastic, keyword:WORD or module:function"
        )
    if kind == "keyword":
        return keyword(argument.strip())
    try:
        scorer: Scorer = getattr(importlib.import_module(kind), argument)
    except (ImportError, AttributeError) as exc:
        raise PreferenceError(f"preference {name!r}: cannot load {argument} from {kind} ({exc})") from exc
    return scorer


def rank(scores: Sequence[float], noise: float = 0.0, rng: random.Random | None = None) -> Tiers:
    """Tiers (best first) from scores, after flipping each compared pair with probability `noise`.

    Every pair of answers is compared (equal scores tie); with noise a comparison goes the other way. The answers
    are then ordered by their number of wins (Copeland), equal wins sharing a tier, so a flip moves an answer by
    at most the one comparison it lost.
    """
    rng = rng or random.Random()
    wins = [0.0] * len(scores)
    for a, b in combinations(range(len(scores)), 2):
        if scores[a] == scores[b]:
            wins[a] += 0.5
            wins[b] += 0.5
            continue
        a_better = scores[a] > scores[b]
        if noise and rng.random() < noise:
            a_better = not a_better
        wins[a if a_better else b] += 1.0
    tiers: Tiers = []
    for value in sorted(set(wins), reverse=True):
        tiers.append([i for i, w in enumerate(wins) if w == value])
    return tiers
