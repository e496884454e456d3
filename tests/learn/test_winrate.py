"""The win-rate estimator on constructed outcomes, intervals worked out by hand."""

import math

import pytest

from learn.winrate import Z95, grouped_interval, outcome, share_low, win_rate


def test_outcomes_of_paired_scores() -> None:
    assert [outcome(2, 1), outcome(1, 2), outcome(1, 1)] == [1.0, 0.0, 0.5]


def test_three_wins_one_loss() -> None:
    # mean 0.75; sample variance (3 * 0.25^2 + 0.75^2) / 3 = 0.25; se sqrt(0.25 / 4) = 0.25; half 1.96 * 0.25 = 0.49
    estimate = win_rate([1, 1, 1, 0])
    assert estimate.rate == 0.75 and (estimate.wins, estimate.ties, estimate.losses) == (3, 0, 1)
    assert estimate.low == pytest.approx(0.26, abs=1e-3) and estimate.high == 1.0  # 1.24 clipped
    assert not estimate.significant()


def test_ties_count_half() -> None:
    # 30 wins, 10 ties: mean 35 / 40 = 0.875; squared deviations 30 * 0.125^2 + 10 * 0.375^2 = 1.875;
    # variance 1.875 / 39 = 0.0480769; se sqrt(0.0480769 / 40) = 0.0346688; half 1.96 * se = 0.0679497
    estimate = win_rate([1.0] * 30 + [0.5] * 10)
    assert estimate.rate == 0.875 and estimate.n == 40
    assert estimate.low == pytest.approx(0.80705, abs=1e-4) and estimate.high == pytest.approx(0.94295, abs=1e-4)
    assert estimate.significant()


def test_all_ties_is_exactly_even() -> None:
    estimate = win_rate([0.5] * 10)
    assert (estimate.rate, estimate.low, estimate.high) == (0.5, 0.5, 0.5) and not estimate.significant()


def test_no_outcomes_is_an_error() -> None:
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])


def test_an_interval_by_groups_worked_by_hand() -> None:
    # Three rankings' pairs: 5 of 6 agree, 1 of 6, 3 of 3. Pooled: 9 of 15 = 0.6.
    # Residuals a_g - p*n_g: 5 - 3.6 = 1.4, 1 - 3.6 = -2.6, 3 - 1.8 = 1.2; squares sum to 10.16;
    # times G/(G-1) = 3/2: 15.24; over N^2 = 225: 0.0677333; the standard error sqrt of it: 0.260256.
    groups = [[1, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 0], [1, 1, 1]]
    low, high = grouped_interval(groups)
    se = math.sqrt(1.5 * 10.16) / 15
    assert se == pytest.approx(0.260256, abs=1e-6)
    assert (low, high) == (pytest.approx(0.6 - Z95 * se), 1.0)  # 0.6 + 0.51, clipped
    # The same 15 outcomes taken as independent claim far more: a low end of 0.352 against 0.090.
    assert share_low(0.6, 15) == pytest.approx(0.6 - Z95 * math.sqrt(0.24 / 15))
    assert low == pytest.approx(0.0899, abs=1e-4) and share_low(0.6, 15) > low + 0.25


def test_groups_that_agree_alike_are_no_surer_than_their_pairs() -> None:
    # Every ranking 2 of 3: no spread between groups, which 10 rankings do not make certain. The width is then the
    # 30 outcomes' own: 2/3 ± 1.96 * sqrt((2/9) / 30).
    low, high = grouped_interval([[1, 1, 0]] * 10)
    assert (low, high) == (pytest.approx(share_low(2 / 3, 30)), pytest.approx(1 - share_low(1 / 3, 30)))


def test_the_interval_stays_within_zero_and_one() -> None:
    # Two rankings, all agree in one and none in the other: 0.5 ± 1.96 * 0.5 reaches past both ends.
    assert grouped_interval([[1, 1, 1], [0, 0, 0]]) == (0.0, 1.0)


def test_fewer_than_two_groups_tell_nothing() -> None:
    assert all(math.isnan(x) for x in grouped_interval([[1, 1, 1, 1, 1, 0]]))
    assert all(math.isnan(x) for x in grouped_interval([[], [1, 0]]))
