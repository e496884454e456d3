"""Win rate of version A over version B from paired outcomes, with a confidence interval.

Each outcome compares A's and B's answer to the same prompt under the same sampling seed: 1 when A's is preferred,
0 when B's is, 0.5 for a tie. The win rate is the mean outcome; the interval is the normal approximation of that
mean (the outcomes' sample standard deviation over sqrt(n)), clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class WinRate:
    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def significant(self) -> bool:
        """A over B beyond chance: the whole interval above one half."""
        return self.low > 0.5


def outcome(score_a: float, score_b: float) -> float:
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def win_rate(outcomes: Sequence[float], z: float = Z95) -> WinRate:
    if not outcomes:
        raise ValueError("no outcomes to estimate a win rate from")
    n = len(outcomes)
    mean = sum(outcomes) / n
    variance = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.25
    half = z * math.sqrt(variance / n)
    wins = sum(o == 1.0 for o in outcomes)
    ties = sum(o == 0.5 for o in outcomes)
    return WinRate(mean, max(0.0, mean - half), min(1.0, mean + half), wins, ties, n - wins - ties)


def grouped_interval(groups: Sequence[Sequence[float]], z: float = Z95) -> tuple[float, float]:
    """(low, high) of the pooled share of outcomes that come in groups, by the groups' spread (the cluster-robust
    variance of a ratio estimate): var = G/(G-1) * sum_g (a_g - p*n_g)^2 / N^2, with a_g the outcomes' sum and n_g
    their count in group g, N = sum n_g and p = sum a_g / N; never less than p(1-p)/N, the outcomes' variance taken
    one by one (a few groups that happen to agree alike show no spread, which is not certainty). Clipped to [0, 1];
    NaN for fewer than two groups with outcomes.

    Why not `share_low`: the C(K,2) pairs of one ranking share its K answers, so a policy that moved one answer
    far moves K-1 pairs together. Counted as independent, the 96 held-out pairs of 19 rankings that the `concise`
    control's drifted v0002 agreed with 59.4% of a token had a low end of 49.6%; by the rankings, 45.7%
    (BENCHMARKS.md, "Reading: the control with the advantage floor")."""
    counted = [(sum(g), len(g)) for g in groups if g]
    if len(counted) < 2:
        return float("nan"), float("nan")
    n = sum(size for _, size in counted)
    share = sum(total for total, _ in counted) / n
    spread = len(counted) / (len(counted) - 1) * sum((total - share * size) ** 2 for total, size in counted)
    half = z * math.sqrt(max(spread / n**2, share * (1.0 - share) / n))
    return max(0.0, share - half), min(1.0, share + half)


def share_low(rate: float, n: int, z: float = Z95) -> float:
    """Lower end of the normal-approximation interval of a share `rate` of `n` yes/no outcomes (NaN for n = 0)."""
    if n <= 0:
        return float("nan")
    return rate - z * math.sqrt(rate * (1.0 - rate) / n)
