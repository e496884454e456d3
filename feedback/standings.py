"""The leaderboard as users' rankings make it: every version compared in mixed comparisons (a canary's), its
Bradley-Terry strength, and each one's win rate against the current version (feedback.leaderboard's math), read
from the dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from feedback.dataset import Dataset
from feedback.events import Comparison
from feedback.leaderboard import HeadToHead, Outcome, bradley_terry, head_to_head, outcomes


@dataclass(frozen=True)
class Standings:
    current: str | None
    strengths: dict[str, float]  # log-strength per version (mean 0), strongest first
    against_current: list[HeadToHead]  # each other version's win rate over the current one
    rankings: int  # rankings of mixed comparisons read
    pairs: int  # head-to-head pairs they hold


def writers(comparison: Comparison) -> list[str]:
    """The version that wrote each candidate, at its index."""
    found = [comparison.policy_version] * (max((c.index for c in comparison.candidates), default=-1) + 1)
    for c in comparison.candidates:
        found[c.index] = c.policy_version or comparison.policy_version
    return found


def standings(dataset_path: Path, current: str | None, since: float | None = None) -> Standings:
    """The rankings of mixed comparisons in the dataset (those accepted after unix time `since`, where given)."""
    found: list[list[Outcome]] = []
    if dataset_path.is_file():
        after = f"{int(since * 1000)}-0" if since is not None else None
        with Dataset(dataset_path) as dataset:
            for _, event in dataset.rankings(after=after):
                versions = writers(event.comparison)
                if len(set(versions)) > 1:
                    found.append(outcomes(versions, event.ranking))
    found = [results for results in found if results]
    every = [outcome for results in found for outcome in results]
    strengths = dict(sorted(bradley_terry(every).items(), key=lambda item: -item[1])) if every else {}
    rivals = [v for v in strengths if v != current]
    against = [h for v in rivals if current and (h := head_to_head(found, v, current)) is not None]
    return Standings(current, strengths, against, len(found), len(every))
