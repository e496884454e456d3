"""Scripted preferences on literal answers, and the rankings simulated users give with them."""

import math
import random

import pytest

from lab.preferences import PreferenceError, concise, enthusiastic, keyword, load_scorer, rank


def test_concise_prefers_shorter_and_puts_empty_last() -> None:
    assert concise("q", "Paris.") == -6.0
    assert concise("q", "Paris.") > concise("q", "The capital is Paris.") > concise("q", "   ")
    assert concise("q", "") == -math.inf


def test_enthusiastic_counts_exclamations_and_positive_words() -> None:
    assert enthusiastic("q", "I love it! Great news!") == 4.0  # 2 marks + love + great
    assert enthusiastic("q", "It is fine.") == 0.0
    assert enthusiastic("q", "AMAZING") == 1.0  # case does not matter


def test_keyword_counts_whole_words() -> None:
    score = keyword("Paris")
    assert score("q", "Paris is in France; paris!") == 2.0
    assert score("q", "a Parisian cafe") == 0.0


def test_preferences_load_by_name() -> None:
    assert load_scorer("concise") is concise
    assert load_scorer("lab.preferences:enthusiastic") is enthusiastic
    assert load_scorer("keyword:sea")("q", "the sea") == 1.0
    with pytest.raises(PreferenceError, match="use concise, enthusiastic, keyword:WORD or module:function"):
        load_scorer("polite")
    with pytest.raises(PreferenceError, match="cannot load judge from no_such_module"):
        load_scorer("no_such_module:judge")


def test_rank_orders_by_score_with_ties_as_tiers() -> None:
    assert rank([1.0, 3.0, 2.0]) == [[1], [2], [0]]
    assert rank([2.0, 2.0, 1.0]) == [[0, 1], [2]]
    assert rank([-math.inf, -5.0]) == [[1], [0]]


def test_noise_flips_each_comparison_with_its_probability() -> None:
    assert rank([1.0, 3.0, 2.0], noise=1.0) == [[0], [2], [1]]  # every pair flipped: the order reversed
    rng = random.Random(7)
    flipped = sum(rank([0.0, 1.0], 0.25, rng) == [[0], [1]] for _ in range(4000))
    assert abs(flipped / 4000 - 0.25) < 0.03
