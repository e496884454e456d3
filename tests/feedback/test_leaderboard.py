"""The leaderboard's math with figures worked out by hand: outcomes of mixed rankings, Bradley-Terry strengths,
the candidate's win rate with its interval by ranking, and the canary's verdict."""

import math

import pytest

from feedback.leaderboard import HeadToHead, bradley_terry, canary_verdict, head_to_head, outcomes


def test_every_pair_of_two_versions_answers_is_one_outcome() -> None:
    # v2 wrote candidates 0 and 2, v1 wrote 1 and 3; 2 first, 0 and 1 tie, 3 last.
    found = outcomes(["v2", "v1", "v2", "v1"], [[2], [0, 1], [3]])
    assert found == [("v2", "v1", 0.5), ("v2", "v1", 1.0), ("v1", "v2", 0.0), ("v2", "v1", 1.0)]


def test_unranked_answers_and_one_versions_pairs_say_nothing() -> None:
    assert outcomes(["v2", "v1", "v1", "v2"], [[1], [0]]) == [("v2", "v1", 0.0)]
    assert outcomes(["v1", "v1", "v1"], [[0], [1], [2]]) == []


def test_two_versions_strengths_are_the_log_of_their_win_ratio() -> None:
    games = [("a", "b", 1.0)] * 3 + [("b", "a", 1.0)]  # a won 3 of 4
    plain = bradley_terry(games, prior=0.0)
    assert plain["a"] == pytest.approx(math.log(3) / 2) and plain["b"] == pytest.approx(-math.log(3) / 2)
    # One tied game of prior: 3.5 wins against 1.5.
    with_prior = bradley_terry(games, prior=1.0)
    assert with_prior["a"] - with_prior["b"] == pytest.approx(math.log(3.5 / 1.5))


def test_three_versions_whose_record_matches_strengths_4_2_1_get_exactly_them() -> None:
    # a-b: a wins 2 of 3 (4/6), b-c: b wins 2 of 3 (2/3), a-c: a wins 4 of 5 (4/5): the likelihood's fixed point.
    games = [("a", "b", 1.0), ("a", "b", 1.0), ("a", "b", 0.0)]
    games += [("b", "c", 1.0), ("c", "b", 0.0), ("b", "c", 0.0)]
    games += [("a", "c", 1.0)] * 4 + [("a", "c", 0.0)]
    strengths = bradley_terry(games, prior=0.0)
    assert strengths == pytest.approx({"a": math.log(2), "b": 0.0, "c": -math.log(2)}, abs=1e-8)


def test_a_version_that_never_won_needs_a_prior() -> None:
    with pytest.raises(ValueError, match="no finite strength"):
        bradley_terry([("a", "b", 1.0), ("a", "b", 1.0)], prior=0.0)
    # With the default prior: 2.5 wins to 0.5, so a is 5 times b.
    strengths = bradley_terry([("a", "b", 1.0), ("a", "b", 1.0)])
    assert strengths["a"] - strengths["b"] == pytest.approx(math.log(5))


def test_the_win_rate_takes_each_ranking_as_one_observation() -> None:
    rankings = [
        [("c", "p", 1.0)],  # mean 1
        [("c", "p", 1.0), ("p", "c", 0.0), ("c", "p", 1.0), ("c", "p", 0.0)],  # 1, 1, 1, 0: mean 0.75
        [("p", "c", 0.5), ("c", "x", 1.0)],  # 0.5; the pair with x is not a c-p pair
        [("x", "p", 1.0)],  # c absent: not an observation
    ]
    result = head_to_head(rankings, "c", "p")
    # Mean 0.75; sample sd of (1, 0.75, 0.5) is 0.25; half-width 1.959964 * 0.25 / sqrt(3) = 0.282896.
    assert result == HeadToHead("c", "p", 0.75, pytest.approx(0.467104, abs=1e-6), 1.0, pairs=6, rankings=3)
    assert head_to_head([[("x", "p", 1.0)]], "c", "p") is None


def verdict_of(low: float, high: float, pairs: int) -> str:
    return canary_verdict(HeadToHead("c", "p", (low + high) / 2, low, high, pairs, pairs // 4), 40, max_pairs=1000)


def test_the_canary_ends_only_on_enough_pairs_and_a_clear_interval() -> None:
    assert verdict_of(0.55, 0.8, 40) == "promote"
    assert verdict_of(0.55, 0.8, 39) == "continue"  # too few pairs yet
    assert verdict_of(0.2, 0.45, 40) == "reject"
    assert verdict_of(0.45, 0.7, 400) == "continue"  # within noise of one half
    assert verdict_of(0.5, 0.7, 400) == "continue"  # the bound must exceed one half
    assert verdict_of(0.45, 0.55, 1000) == "undecided"  # too close to tell apart: it ends without a winner
    assert verdict_of(0.51, 0.6, 1000) == "promote"
    assert canary_verdict(None, min_pairs=0) == "continue"
