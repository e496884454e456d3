"""Rankings as users send them, and the (chosen, rejected) pairs they imply. Pure functions, no I/O.

A ranking lists candidate indices best first. An entry is an index or a list of indices that tie:
`[[2], [0, 3], [1]]` says 2 beats 0 and 3, which tie, and both beat 1. Unranked candidates say nothing.
"""

from __future__ import annotations

from itertools import combinations

RankingInput = list[int | list[int]]
Tiers = list[list[int]]


class RankingError(ValueError):
    """A ranking that cannot be used; the message says what to fix."""


def to_tiers(ranking: RankingInput, k: int | None) -> Tiers:
    """Normalise a ranking of `k` candidates into tiers (best first), checking every index.

    Raises RankingError for an empty tier, an index outside 0..k-1 (only below 0 when `k` is None: the caller
    checks the upper bound where the comparison is), an index given twice, or fewer than 2 candidates ranked
    (a single candidate orders nothing).
    """
    tiers: Tiers = []
    seen: set[int] = set()
    for position, entry in enumerate(ranking):
        tier = [entry] if isinstance(entry, int) else list(entry)
        if not tier:
            raise RankingError(f"ranking[{position}] is an empty list; give at least one candidate index")
        for index in tier:
            if index < 0 or (k is not None and index >= k):
                raise RankingError(out_of_range(index, k))
            if index in seen:
                raise RankingError(f"candidate index {index} appears more than once in the ranking")
            seen.add(index)
        tiers.append(tier)
    if len(seen) < 2:
        raise RankingError(f"rank at least 2 candidates; {len(seen)} given")
    return tiers


def out_of_range(index: int, k: int | None) -> str:
    if k is None:
        return f"candidate index {index} is out of range: indices start at 0"
    return f"candidate index {index} is out of range: this comparison has {k} (0..{k - 1})"


def pairs(tiers: Tiers) -> list[tuple[int, int]]:
    """Every (chosen, rejected) pair the tiers imply: each candidate beats all candidates in later tiers.

    Ties produce no pair. A full ranking of K distinct tiers gives C(K, 2) pairs.
    """
    return [
        (winner, loser)
        for better, worse in combinations(range(len(tiers)), 2)
        for winner in tiers[better]
        for loser in tiers[worse]
    ]
