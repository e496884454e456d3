"""Rankings to tiers and pairs, on literal lists."""

import pytest

from feedback.ranking import RankingError, pairs, to_tiers


def test_plain_indices_become_one_tier_each() -> None:
    assert to_tiers([2, 0, 1], k=3) == [[2], [0], [1]]


def test_nested_lists_are_ties() -> None:
    assert to_tiers([[2], [0, 3], 1], k=4) == [[2], [0, 3], [1]]


def test_full_ranking_of_four_gives_all_six_pairs_best_first() -> None:
    assert pairs([[3], [1], [0], [2]]) == [(3, 1), (3, 0), (3, 2), (1, 0), (1, 2), (0, 2)]


def test_ties_produce_no_pair_between_them() -> None:
    # 2 beats 0 and 3; 0 and 3 tie (no pair); both beat 1: 2 + 1 + 2 = 5 pairs, not C(4,2) = 6.
    assert pairs([[2], [0, 3], [1]]) == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]


def test_all_tied_orders_nothing() -> None:
    assert pairs(to_tiers([[0, 1, 2]], k=3)) == []


def test_partial_ranking_pairs_only_the_ranked() -> None:
    assert pairs(to_tiers([1, 3], k=4)) == [(1, 3)]


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        ([0, 4], "candidate index 4 is out of range: this comparison has 4 (0..3)"),
        ([-1, 0], "candidate index -1 is out of range"),
        ([0, [1, 0]], "candidate index 0 appears more than once"),
        ([2], "rank at least 2 candidates; 1 given"),
        ([[], 1], "ranking[0] is an empty list"),
    ],
)
def test_bad_rankings_say_what_to_fix(ranking: list[int | list[int]], message: str) -> None:
    with pytest.raises(RankingError) as raised:
        to_tiers(ranking, k=4)
    assert message in str(raised.value)
