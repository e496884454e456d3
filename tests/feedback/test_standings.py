"""The leaderboard read from the dataset: only mixed comparisons count, each answer labelled with the version that
wrote it; figures worked out by hand."""

import json
import math
from pathlib import Path

import pytest

from feedback.dataset import Dataset
from feedback.standings import standings

CANDIDATE_FIRST, CURRENT_FIRST = [[0], [2], [1], [3]], [[1], [3], [0], [2]]


def ranking(n: int, ms: int, tiers: list[list[int]], mixed: bool = True) -> tuple[str, str, str]:
    """Ranking n of a comparison v0001 served; where `mixed`, v0002 wrote candidates 0 and 2."""
    candidates = [
        {
            "index": k,
            "text": f"answer {k}",
            "token_ids": [k + 1],
            "logprobs": [-1.0],
            "finish_reason": "stop",
            "policy_version": "v0002" if mixed and k in (0, 2) else None,
        }
        for k in range(4)
    ]
    comparison = {
        "id": f"c{n}",
        "messages": [{"role": "user", "content": f"q{n}"}],
        "prompt_token_ids": [1, 2],
        "candidates": candidates,
        "policy_version": "v0001",
        "created": 0.0,
    }
    data = {"kind": "ranking", "ranking": tiers, "user": None, "created": 0.0, "comparison": comparison}
    return f"{ms}-0", "ranking", json.dumps(data)


def test_the_candidate_wins_8_of_10_rankings(tmp_path: Path) -> None:
    path = tmp_path / "feedback.sqlite3"
    rows = [ranking(0, 1_000, CURRENT_FIRST)]  # before the canary started: not counted
    rows += [ranking(n, 5_000 + n, CANDIDATE_FIRST) for n in range(1, 9)]
    rows += [ranking(n, 5_000 + n, CURRENT_FIRST) for n in range(9, 11)]
    rows += [ranking(n, 5_000 + n, CANDIDATE_FIRST, mixed=False) for n in range(11, 14)]  # one version: nothing
    with Dataset(path) as dataset:
        dataset.insert(rows)
    found = standings(path, "v0001", since=2.0)
    assert (found.rankings, found.pairs) == (10, 40)
    # Bradley-Terry with one tied game of prior: v0002 won 32 + 0.5 of 41, v0001 8 + 0.5.
    assert list(found.strengths) == ["v0002", "v0001"]
    assert found.strengths["v0002"] == pytest.approx(math.log(32.5 / 8.5) / 2)
    [versus] = found.against_current
    # Per ranking 1 (8 times) or 0 (twice): mean 0.8, sd 0.421637, half-width 1.959964 * 0.421637 / sqrt(10).
    assert (versus.candidate, versus.current, versus.pairs, versus.rankings) == ("v0002", "v0001", 40, 10)
    assert versus.rate == pytest.approx(0.8)
    assert versus.low == pytest.approx(0.8 - 0.261329, abs=1e-6) and versus.high == 1.0
    everything = standings(path, "v0001")
    assert everything.rankings == 11 and everything.against_current[0].rate == pytest.approx(8 / 11)


def test_no_dataset_or_no_mixed_comparison_is_an_empty_board(tmp_path: Path) -> None:
    empty = standings(tmp_path / "none.sqlite3", "v0001")
    assert (empty.strengths, empty.against_current, empty.rankings, empty.pairs) == ({}, [], 0, 0)
    path = tmp_path / "feedback.sqlite3"
    with Dataset(path) as dataset:
        dataset.insert([ranking(1, 5_000, CANDIDATE_FIRST, mixed=False)])
    assert standings(path, "v0001").rankings == 0
