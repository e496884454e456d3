"""The win-rate estimator on constructed outcomes, intervals worked out by hand."""

import pytest

from learn.winrate import outcome, win_rate


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
