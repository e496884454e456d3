"""Policy versions judged by people: head-to-head outcomes from rankings of comparisons whose answers several
versions wrote, Bradley-Terry strengths of every version, and a candidate's win rate over the current version with
the rule that ends a canary. Pure functions, no I/O.

Each answer of a comparison carries the version that wrote it. In a ranking, every pair of answers by two different
versions is one outcome for the first: 1 when it is in a better tier, 0 in a worse one, 0.5 in the same; pairs of
one version's answers, and unranked answers, say nothing about versions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from statistics import NormalDist
from typing import Literal

from feedback.ranking import Tiers

Z95 = NormalDist().inv_cdf(0.975)
Outcome = tuple[str, str, float]  # (version a, version b, a's score: 1 won, 0.5 tied, 0 lost)


def outcomes(versions: Sequence[str], tiers: Tiers) -> list[Outcome]:
    """The head-to-head outcomes of one ranking; `versions[i]` wrote candidate i."""
    tier_of = {index: position for position, tier in enumerate(tiers) for index in tier}
    found = []
    for i, j in combinations(sorted(tier_of), 2):
        if versions[i] != versions[j]:
            a, b = tier_of[i], tier_of[j]
            found.append((versions[i], versions[j], 1.0 if a < b else 0.0 if a > b else 0.5))
    return found


def bradley_terry(
    results: Iterable[Outcome], prior: float = 1.0, tolerance: float = 1e-10, max_steps: int = 10_000
) -> dict[str, float]:
    """Each version's log-strength (natural log, mean 0 over the versions): under Bradley-Terry, a beats b with
    probability 1 / (1 + exp(b - a)); a tie counts half a win to each.

    Maximum likelihood by Hunter's MM iteration (2004). `prior` adds that many tied games between every two versions
    that met: a version that never won (or never lost) still gets a finite strength, pulled towards its opponents'.
    """
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for a, b, score in results:
        wins[a] += score
        wins[b] += 1.0 - score
        games[min(a, b), max(a, b)] += 1.0
    for pair in games:
        games[pair] += prior
        wins[pair[0]] += prior / 2
        wins[pair[1]] += prior / 2
    for version, won in wins.items():
        played = sum(n for pair, n in games.items() if version in pair)
        if not 0.0 < won < played:
            raise ValueError(f"{version} won all or none of its games: no finite strength without a prior above 0")
    strength = dict.fromkeys(wins, 1.0)
    for _ in range(max_steps):
        updated = {v: wins[v] / _expected_games(v, strength, games) for v in strength}
        scale = math.exp(sum(math.log(p) for p in updated.values()) / len(updated))  # geometric mean 1
        updated = {v: p / scale for v, p in updated.items()}
        moved = max(abs(math.log(updated[v] / strength[v])) for v in strength)
        strength = updated
        if moved < tolerance:
            break
    return {v: math.log(p) for v, p in strength.items()}


def _expected_games(version: str, strength: dict[str, float], games: dict[tuple[str, str], float]) -> float:
    """MM's denominator: the games `version` played, each weighted by 1 / (its strength + its opponent's)."""
    total = 0.0
    for (a, b), n in games.items():
        if version in (a, b):
            total += n / (strength[a] + strength[b])
    return total


@dataclass(frozen=True)
class HeadToHead:
    """`candidate`'s win rate over `current` with its 95% interval, from `rankings` rankings holding `pairs`
    pairs of their two answers."""

    candidate: str
    current: str
    rate: float
    low: float
    high: float
    pairs: int
    rankings: int


def head_to_head(rankings: Iterable[list[Outcome]], candidate: str, current: str) -> HeadToHead | None:
    """The candidate's win rate over the current version (None: no ranking compared them).

    The unit is a ranking, not a pair: one user's ranking of a 2+2 split gives 4 pairs that are far from
    independent. Each ranking's mean outcome for the candidate is one observation; the rate is their mean, the
    interval the normal approximation of that mean (sample standard deviation over sqrt(n)), clipped to [0, 1].
    """
    means, pairs = [], 0
    for results in rankings:
        scores = [s if a == candidate else 1.0 - s for a, b, s in results if {a, b} == {candidate, current}]
        if scores:
            means.append(sum(scores) / len(scores))
            pairs += len(scores)
    if not means:
        return None
    n = len(means)
    rate = sum(means) / n
    variance = sum((m - rate) ** 2 for m in means) / (n - 1) if n > 1 else 0.25
    half = Z95 * math.sqrt(variance / n)
    return HeadToHead(candidate, current, rate, max(0.0, rate - half), min(1.0, rate + half), pairs, n)


Verdict = Literal["promote", "reject", "undecided", "continue"]


def canary_verdict(result: HeadToHead | None, min_pairs: int, max_pairs: int | None = None) -> Verdict:
    """After at least `min_pairs` pairs: promote when the interval is wholly above one half, reject when wholly
    below; otherwise the canary goes on collecting, up to `max_pairs` (then `undecided`: the two are too close for
    users to tell apart, and the canary ends without a winner rather than run for ever)."""
    if result is None or result.pairs < min_pairs:
        return "continue"
    if result.low > 0.5:
        return "promote"
    if result.high < 0.5:
        return "reject"
    return "undecided" if max_pairs is not None and result.pairs >= max_pairs else "continue"
