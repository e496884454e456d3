"""The promotion gate does not rest on the reward model alone: degenerate answers, the KL budget, agreement with
held-out rankings and fluency each refuse a version on their own; and a reward model that loves empty answers
gets PPO to answer empty, and that version is not promoted."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import torch

from deploy.model_store import ModelStore
from deploy.registry import Registry
from deploy.settings import load_settings
from learn import degenerate, layers
from learn.gate import Limits, promotion_gate
from learn.policy_eval import (
    Agreement,
    Answers,
    PolicyEval,
    agreement,
    detrended,
    per_token,
    share_agreeing,
    step_kl,
)
from learn.ppo import AdapterOff, Packed, PPOConfig, backbone
from learn.ppo_run import RoundConfig
from learn.reward_model import RewardScorer
from learn.rm_data import RankedGroup
from learn.rounds import PPOOptions, ppo_round
from learn.weights import LoraOptions, as_stored, load_causal_lm
from learn.winrate import Z95
from tests.learn.test_ppo_round import make_data_dir
from tests.tiny import tiny_teachable_folder


def ev(
    reward: float = 0.1,
    ptx: float | None = 2.0,
    length: float = 40.0,
    empty: float = 0.0,
    degenerate_share: float = 0.0,
    truncated: float = 0.2,
    kl: float = 3.0,
    se: float = 0.0,
    parent_kl: float = 3.0,
) -> PolicyEval:
    return PolicyEval(reward, kl, ptx, length, 32, [], empty, degenerate_share, truncated, se, parent_kl)


def agreeing(share: float, pairs: int) -> Agreement:
    """The same share of held-out pairs whichever way it is read (summed log-ratios or a token)."""
    return Agreement(share, pairs, per_token=share)


AGREES = agreeing(0.7, 40)


def test_a_better_version_passes() -> None:
    verdict = promotion_gate(ev(0.1), ev(0.3, 2.1), AGREES, Limits(), reference_ptx=2.0)
    assert verdict.passed, verdict.why
    assert verdict.why == "mean reward 0.100 → 0.300, agrees with 70% of 40 held-out ranked pairs, 0% empty, KL 3.0"


@pytest.mark.parametrize(
    ("after", "why"),
    [
        (ev(5.0, empty=0.25), "25% of its answers are empty (the current version: 0%)"),
        (ev(5.0, degenerate_share=0.1), "10% of its answers are empty or looping (the current version: 0%)"),
        (ev(5.0, truncated=0.5), "50% of its answers are cut by the length limit (the current version: 20%)"),
        (ev(5.0, length=12.0), "its answers collapsed to 12.0 tokens on average (the current version: 40.0)"),
        (ev(5.0, kl=31.0), "KL to the reference 31.0 exceeds the budget of 30"),
        (
            ev(5.0, parent_kl=0.1),
            "it hardly moved from its parent (KL 0.10 nats an answer, below 0.5): nothing new to serve",
        ),
        (ev(0.05), "mean reward 0.050 is below the current version's 0.100 beyond its noise (±0.000)"),
        (ev(5.0, ptx=2.3), "held-out LM loss 2.300 exceeds 1.1x the reference's 2.000"),
    ],
)
def test_each_check_refuses_on_its_own_however_high_the_reward(after: PolicyEval, why: str) -> None:
    # A reward of 5.0 against 0.1: the reward model alone would promote every one of these.
    verdict = promotion_gate(ev(0.1), after, AGREES, Limits(), reference_ptx=2.0)
    assert not verdict.passed and verdict.why == why


def test_the_rankings_users_held_out_must_agree_and_be_enough() -> None:
    few = promotion_gate(ev(0.1), ev(5.0), agreeing(0.9, 10), Limits())
    assert not few.passed and few.why == "only 10 held-out ranked pairs to check it against users (fewer than 20)"
    against = promotion_gate(ev(0.1), ev(5.0), agreeing(0.5, 60), Limits())
    assert not against.passed and against.why == "it agrees with 50% of 60 held-out ranked pairs (below 55%)"
    assert not promotion_gate(ev(0.1), ev(5.0), agreeing(float("nan"), 0), Limits(min_agreement_pairs=0)).passed
    # 60% of 30 pairs: 95% interval 0.6 ± 1.96 * sqrt(0.24 / 30) = 0.6 ± 0.175, so its low end is 42.5%.
    chance = promotion_gate(ev(0.1), ev(5.0), agreeing(0.6, 30), Limits())
    assert not chance.passed and chance.why == (
        "it agrees with 60% of 30 held-out ranked pairs, not beyond chance (95% low 42%)"
    )
    assert promotion_gate(ev(0.1), ev(5.0), agreeing(0.6, 300), Limits()).passed  # ± 0.055: low 54.5%


def test_a_version_refused_for_want_of_evidence_alone_is_undecided() -> None:
    # 60% of 30 pairs (low 42%), 90% of 10 pairs (fewer than 20) and 53% of 60 (below 55%, 95% high 66%): users
    # lean its way, more pairs could get it through, and nothing else refuses it.
    for leaning in (agreeing(0.6, 30), agreeing(0.9, 10), agreeing(0.53, 60)):
        verdict = promotion_gate(ev(0.1), ev(5.0), leaning, Limits(), reference_ptx=2.0)
        assert not verdict.passed and verdict.undecided, verdict.why
    # Against users (49%), a coin's half, no pairs at all, short of the bar beyond doubt (52% of 2000 pairs: 95% high
    # 0.52 + 1.96 * sqrt(0.2496 / 2000) = 54.2%), or for cause besides the evidence: refused, and not undecided.
    refused = [
        promotion_gate(ev(0.1), ev(5.0), agreeing(0.49, 60), Limits()),
        promotion_gate(ev(0.1), ev(5.0), agreeing(0.5, 60), Limits()),
        promotion_gate(ev(0.1), ev(5.0), agreeing(0.52, 2000), Limits()),
        promotion_gate(ev(0.1), ev(5.0), agreeing(float("nan"), 0), Limits()),
        promotion_gate(ev(0.1), ev(0.05), agreeing(0.6, 30), Limits()),  # the reward fell beyond its noise
        promotion_gate(ev(0.1), ev(5.0, ptx=2.3), agreeing(0.6, 30), Limits(), reference_ptx=2.0),  # less fluent
        promotion_gate(ev(0.1), ev(5.0, empty=0.25), agreeing(0.6, 30), Limits()),
        promotion_gate(ev(0.1), ev(5.0, parent_kl=0.1), agreeing(0.6, 30), Limits()),
    ]
    for verdict in refused:
        assert not verdict.passed and not verdict.undecided, verdict.why
    # The reason given is still the first that fails, the evidence before the reward's word.
    assert refused[4].why == "it agrees with 60% of 30 held-out ranked pairs, not beyond chance (95% low 42%)"
    # Read since the reference, a step that went back on users beyond chance is not undecided either.
    back = Agreement(0.5, 60, per_token=0.3, reference=0.6, intervals={})
    verdict = promotion_gate(ev(0.1), ev(5.0), back, Limits(agreement_by="reference"))
    assert not verdict.passed and not verdict.undecided, verdict.why
    assert not promotion_gate(ev(0.1), ev(5.0), agreeing(0.6, 300), Limits()).undecided  # passed: decided


def test_beyond_chance_is_judged_by_the_rankings_not_by_their_pairs() -> None:
    # 63% of 90 pairs taken as independent: low end 0.63 - 1.96 * sqrt(0.63 * 0.37 / 90) = 53.0%, beyond chance.
    # The same pairs come from 15 rankings whose shares spread: by them the low end is 45% (learn.winrate), and
    # the version is refused, saying how it was judged.
    by_rankings = Agreement(0.63, 90, per_token=0.63, groups=15, intervals={"per_token": (0.45, 0.81)})
    rankings = Limits(agreement_interval="rankings")
    pooled = promotion_gate(ev(0.1), ev(5.0), by_rankings, Limits(agreement_interval="pairs"))
    assert pooled.passed, pooled.why
    verdict = promotion_gate(ev(0.1), ev(5.0), by_rankings, rankings)
    assert not verdict.passed and verdict.why == (
        "it agrees with 63% of 90 held-out ranked pairs, not beyond chance (95% low 45%, by their 15 rankings)"
    )
    # Too few rankings to measure a spread (NaN) is not beyond chance either.
    one = Agreement(0.9, 30, per_token=0.9, groups=1, intervals={"per_token": (float("nan"), float("nan"))})
    assert not promotion_gate(ev(0.1), ev(5.0), one, replace(rankings, min_agreement_pairs=6)).passed
    # Rankings that agree alike pass on their own interval; a share whose rankings are not known does not pass.
    alike = Agreement(0.63, 90, per_token=0.63, groups=15, intervals={"per_token": (0.56, 0.70)})
    assert promotion_gate(ev(0.1), ev(5.0), alike, rankings).passed
    unknown = promotion_gate(ev(0.1), ev(5.0), agreeing(0.63, 90), rankings)
    assert not unknown.passed and unknown.why == (
        "its 90 held-out ranked pairs come from 0 ranking(s), too few to measure how much they vary"
    )


def test_the_gate_reads_agreement_a_token_unless_told_to_read_the_sums() -> None:
    # A drifting policy's summed log-ratios side with the shorter answer: 70% of 300 pairs where users preferred
    # shorter answers, 50% a token. Read a token (the default) it is refused; read summed it would pass.
    drifted = Agreement(0.7, 300, per_token=0.5)
    verdict = promotion_gate(ev(0.1), ev(5.0), drifted, Limits())
    assert not verdict.passed and verdict.why == "it agrees with 50% of 300 held-out ranked pairs (below 55%)"
    assert promotion_gate(ev(0.1), ev(5.0), drifted, Limits(agreement_by="sum")).passed
    # And the other way: 45% summed where users preferred longer answers, 60% a token: promoted.
    learned = promotion_gate(ev(0.1), ev(5.0), Agreement(0.45, 300, per_token=0.6), Limits())
    assert learned.passed and "agrees with 60% of 300 held-out ranked pairs" in learned.why
    # Pairs judged, but the share a token left unset: refused, saying so.
    unset = promotion_gate(ev(0.1), ev(5.0), Agreement(0.7, 300), Limits())
    assert not unset.passed and unset.why == "no agreement per token measured on its held-out pairs"


def test_agreement_a_token_divides_by_each_answers_own_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy that drifted by exactly 0.5 a token (its parent's log-probabilities less 0.5 at every answer token):
    summed, it sides with the shorter answer of each pair; a token, every pair is a tie, whatever the prompts'
    lengths (a length counted with the prompt, or not at all, would break the ties)."""
    import learn.policy_eval

    drifted, parent = object(), object()

    def fake_logprobs(model: object, packed: Packed, split: int = 0, below: object = None) -> torch.Tensor:
        return packed.mask * (-0.5 if model is drifted else 0.0)

    monkeypatch.setattr(learn.policy_eval, "answer_logprobs", fake_logprobs)
    monkeypatch.setattr(learn.policy_eval, "device_of", lambda model: torch.device("cpu"))
    long_prompt, short_prompt = list(range(3, 15)), [3, 4]
    groups = [  # users preferred the longer answer both times: 5 tokens over 2, then 6 over 1
        RankedGroup("a", [[*long_prompt, 5, 6, 7, 8, 2], [*long_prompt, 9, 2]], [[0], [1]], answer_lens=(5, 2)),
        RankedGroup("b", [[*short_prompt, 5, 6, 7, 8, 9, 2], [*short_prompt, 2]], [[0], [1]], answer_lens=(6, 1)),
    ]
    found = agreement(drifted, parent, groups, pad=0)
    assert (found.pairs, found.rate, found.per_token) == (2, 0.0, 0.5)


def test_agreement_keeps_which_ranking_each_pair_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four rankings of three answers (three pairs each). The policy raises token 5 by 1 a token over its parent.
    Rankings "a", "c" and "d" preferred the answers with more 5s (3 of 3 pairs agree), "b" the ones with fewer (0 of
    3). Pooled 9 of 12 = 0.75; by the rankings: residuals 0.75 three times and -2.25, squares 6.75, times 4/3 = 9,
    sqrt 3, over 12 pairs: a standard error of 0.25, so a low end of 0.75 - 1.96 * 0.25 = 0.26 (the high end
    clipped to 1), where twelve independent pairs would give 0.75 - 1.96 * 0.125 = 0.505."""
    import learn.policy_eval

    policy, parent = object(), object()

    def fake_logprobs(model: object, packed: Packed, split: int = 0, below: object = None) -> torch.Tensor:
        return packed.mask * (packed.answer_ids == 5).float() * (1.0 if model is policy else 0.0)

    monkeypatch.setattr(learn.policy_eval, "answer_logprobs", fake_logprobs)
    monkeypatch.setattr(learn.policy_eval, "device_of", lambda model: torch.device("cpu"))
    prompt = list(range(6, 16))  # longer than every answer
    answers = [[5, 5, 2], [5, 8, 2], [8, 8, 2]]  # 2/3, 1/3 and 0 a token
    liked, disliked = [[0], [1], [2]], [[2], [1], [0]]
    groups = [
        RankedGroup(key, [[*prompt, *a] for a in answers], tiers, answer_lens=(3, 3, 3))
        for key, tiers in (("a", liked), ("b", disliked), ("c", liked), ("d", liked))
    ]
    found = agreement(policy, parent, groups, pad=0)
    assert (found.pairs, found.groups, found.per_token) == (12, 4, 0.75)
    low, high = found.interval("per_token", "rankings")
    assert (low, high) == (pytest.approx(0.75 - Z95 * 0.25), 1.0)
    assert found.figures()["agreement_per_token_low"] == pytest.approx(0.75 - Z95 * 0.25)
    pairs_low, _ = found.interval("per_token", "pairs")
    assert pairs_low == pytest.approx(0.75 - Z95 * math.sqrt(0.75 * 0.25 / 12))
    # Read by rankings where none were kept (an Agreement built from shares alone): nothing to be sure of.
    assert all(math.isnan(x) for x in Agreement(0.5, 6, per_token=0.5).interval("per_token", "rankings"))


def test_read_against_the_reference_a_small_step_on_top_of_learned_ones_passes_and_a_step_back_does_not() -> None:
    # v0004 of the 12-06 RLOO hour: 50% a token against its parent v0003, but what v0002..v0004 learned together
    # agrees with 60% of 300 pairs. Read against the parent it is held back; against the reference it passes.
    small_step = Agreement(0.6, 300, per_token=0.5, reference=0.6)
    assert not promotion_gate(ev(0.1), ev(5.0), small_step, Limits()).passed
    verdict = promotion_gate(ev(0.1), ev(5.0), small_step, Limits(agreement_by="reference"))
    assert verdict.passed and "agrees with 60% of 300 held-out ranked pairs since the reference" in verdict.why
    # A step back: 40% of 300 against its parent (95% high 40% + 1.96 * sqrt(0.24 / 300) = 45.5%), though the
    # ancestors' steps still hold 60% against the reference.
    by_reference = Limits(agreement_by="reference")
    back = promotion_gate(ev(0.1), ev(5.0), Agreement(0.6, 300, per_token=0.4, reference=0.6), by_reference)
    assert not back.passed and back.why == (
        "against its parent it agrees with 40% of 300 held-out ranked pairs a token, below half beyond chance "
        "(95% high 46%): it went back on what users preferred"
    )
    # 47% of 300 (95% high 52.6%) is within chance of a step that moved nothing: it passes.
    within = Agreement(0.6, 300, per_token=0.47, reference=0.6)
    assert promotion_gate(ev(0.1), ev(5.0), within, by_reference).passed
    # Drift since the reference agrees with half: refused, saying against what.
    drifted = promotion_gate(ev(0.1), ev(5.0), Agreement(0.7, 300, per_token=0.6, reference=0.5), by_reference)
    assert drifted.why == "it agrees with 50% of 300 held-out ranked pairs since the reference (below 55%)"
    unset = promotion_gate(ev(0.1), ev(5.0), Agreement(0.7, 300, per_token=0.6), by_reference)
    assert unset.why == "no agreement per token since the reference measured on its held-out pairs"


def test_agreement_against_the_reference_reads_what_the_parent_learned_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: 0 at every token. Parent: +0.5 at each token 5 (users' preferred answers hold them). Policy: the
    parent less 0.25 at every answer token (a drift). Against the parent every pair ties a token (-0.25 each);
    against the reference the preferred answers rose. Prompts longer and shorter than their answers."""
    import learn.policy_eval

    policy, parent, reference = object(), object(), object()
    calls: list[object] = []

    def fake_logprobs(model: object, packed: Packed, split: int = 0, below: object = None) -> torch.Tensor:
        calls.append(model)
        learned = 0.5 * (packed.answer_ids == 5).float() if model is not reference else 0.0
        return packed.mask * (learned - (0.25 if model is policy else 0.0))

    monkeypatch.setattr(learn.policy_eval, "answer_logprobs", fake_logprobs)
    monkeypatch.setattr(learn.policy_eval, "device_of", lambda model: torch.device("cpu"))
    long_prompt, short_prompt = list(range(6, 18)), [6, 7]
    groups = [  # the preferred answer first: 2 of 4 tokens are 5; then 1 of 6
        RankedGroup("a", [[*long_prompt, 5, 5, 8, 2], [*long_prompt, 9, 2]], [[0], [1]], answer_lens=(4, 2)),
        RankedGroup("b", [[*short_prompt, 9, 9, 9, 5, 9, 2], [*short_prompt, 8, 2]], [[0], [1]], answer_lens=(6, 2)),
        RankedGroup("c", [[*short_prompt, 8, 2], [*short_prompt, 5, 2]], [[1], [0]], answer_lens=(2, 2)),
    ]
    found = agreement(policy, parent, groups, pad=0, reference=reference)
    assert (found.pairs, found.per_token, found.reference) == (3, 0.5, 1.0)
    assert len(calls) == 3  # one batch, three models
    # The first round's parent is the reference: one pass serves both readings.
    calls.clear()
    first = agreement(policy, parent, groups, pad=0, reference=parent)
    assert first.reference == first.per_token == 0.5 and len(calls) == 2


def test_a_lower_reward_counts_against_a_version_only_beyond_its_noise() -> None:
    # Standard errors 0.2 and 0.2: 1.96 * hypot(0.2, 0.2) = 0.554 either way of the current version's 0.5.
    assert promotion_gate(ev(0.5, se=0.2), ev(0.3, se=0.2), AGREES, Limits()).passed
    lower = promotion_gate(ev(0.5, se=0.2), ev(-0.1, se=0.2), AGREES, Limits())
    assert not lower.passed
    assert lower.why == "mean reward -0.100 is below the current version's 0.500 beyond its noise (±0.554)"


def test_fluency_is_measured_against_the_reference_not_the_drifting_parent() -> None:
    # The parent already drifted to 2.2; 2.3 is within 1.1x of it but not of the reference's 2.0.
    assert promotion_gate(ev(0.1, ptx=2.2), ev(0.3, ptx=2.3), AGREES, Limits()).passed
    assert not promotion_gate(ev(0.1, ptx=2.2), ev(0.3, ptx=2.3), AGREES, Limits(), reference_ptx=2.0).passed


def test_shares_are_capped_over_rounds_not_only_per_round() -> None:
    # Each round may add 2 points of empty answers and 5 of looping ones, but not past the caps (2%, 10%): ten
    # rounds that each rose by the allowance would otherwise reach 20% empty.
    assert promotion_gate(ev(0.1, empty=0.0), ev(0.3, empty=0.02), AGREES, Limits()).passed
    over = promotion_gate(ev(0.1, empty=0.01), ev(0.3, empty=0.03), AGREES, Limits())
    assert not over.passed and over.why == (
        "3% of its answers are empty (the cap: 2%, or the current version's 1% where higher)"
    )
    assert promotion_gate(ev(0.1, degenerate_share=0.06), ev(0.3, degenerate_share=0.1), AGREES, Limits()).passed
    assert not promotion_gate(ev(0.1, degenerate_share=0.08), ev(0.3, degenerate_share=0.12), AGREES, Limits()).passed
    # A parent above the cap may be matched or improved on, never made worse.
    assert promotion_gate(ev(0.1, degenerate_share=0.2), ev(0.3, degenerate_share=0.2), AGREES, Limits()).passed
    assert not promotion_gate(ev(0.1, degenerate_share=0.2), ev(0.3, degenerate_share=0.22), AGREES, Limits()).passed


def test_a_version_that_hardly_moved_is_refused_however_well_it_agrees() -> None:
    """A round whose score said nothing (the control, KL 0.09 to its parent) agreed with 61% of 142 held-out pairs
    and was promoted: the signs of tiny log-ratios are noise. The floor refuses it; an operator may lower it."""
    many = agreeing(0.61, 142)  # low end 53%: beyond chance with the pairs taken as independent
    verdict = promotion_gate(ev(0.1), ev(0.3, parent_kl=0.1), many, Limits())
    assert not verdict.passed and verdict.why.startswith("it hardly moved from its parent (KL 0.10")
    assert promotion_gate(ev(0.1), ev(0.3, parent_kl=0.5), many, Limits()).passed  # at the floor: moved
    # A floor of 0 is none: a step estimated a little below 0 (noise about no move) and one not measured pass.
    for step in (0.1, -0.07, float("nan")):
        assert promotion_gate(ev(0.1), ev(0.3, parent_kl=step), many, Limits(min_step_kl=0.0)).passed


@pytest.mark.parametrize(
    "field", ["reward", "kl", "ptx", "length", "empty", "degenerate_share", "truncated", "parent_kl"]
)
def test_a_figure_that_is_not_a_number_fails_the_gate(field: str) -> None:
    assert not promotion_gate(
        ev(0.1), ev(**{"reward": 0.3, field: float("nan")}), AGREES, Limits(), reference_ptx=2.0
    ).passed


# -- degenerate answers -------------------------------------------------------------------------------------------


def test_degenerate_answers_by_hand() -> None:
    assert degenerate.kind("  \n", [2]) == "empty"
    # 16 tokens looping "1 2 3 4": 13 4-grams, of which the first 4 are new and 9 repeat: 9/13 = 0.69 >= 0.5.
    loop = [1, 2, 3, 4] * 4
    assert degenerate.repeated_share(loop) == pytest.approx(9 / 13)
    assert degenerate.kind("one two three four " * 4, loop) == "loop"
    # 12 distinct tokens: no 4-gram repeats.
    assert degenerate.repeated_share(list(range(12))) == 0.0
    assert degenerate.kind("a fine answer", list(range(12))) is None
    assert degenerate.kind("yes yes yes", [7, 7, 7]) is None  # too short to call a loop
    shares = degenerate.shares(["", "fine", "x", "loop"], [[2], [5, 6], [9], loop], [False, False, True, True])
    assert (shares.empty, shares.degenerate, shares.truncated) == (0.25, 0.5, 0.5)


# -- agreement with held-out rankings -----------------------------------------------------------------------------


def test_agreement_counts_the_pairs_the_new_policy_moved_towards_the_users_choice(tiny_store: ModelStore) -> None:
    parent, _ = load_causal_lm(tiny_store.path("v0001"))
    policy, _ = load_causal_lm(tiny_store.path("v0001"))
    bias = torch.zeros(policy.config.vocab_size)
    bias[30] = 3.0  # the new policy likes token 30 more than its parent did, everywhere
    original = policy.lm_head.forward
    policy.lm_head.forward = lambda hidden: original(hidden) + bias  # type: ignore[method-assign]
    prompt = [5, 6, 7]
    with_30, without = [*prompt, 30, 31, 2], [*prompt, 40, 41, 2]
    groups = [
        RankedGroup("a", [with_30, without], [[0], [1]], answer_lens=(3, 3)),  # users preferred token 30: agrees
        RankedGroup("b", [without, with_30, without], [[0], [1, 2]], answer_lens=(3, 3, 3)),  # against, and a tie
    ]
    found = agreement(policy, parent, groups, pad=0)
    # Pairs: (a: 0 over 1) agrees; (b: 0 over 1) disagrees; (b: 0 over 2): the same answer, no shift: a tie (0.5).
    assert found.pairs == 3 and found.rate == pytest.approx((1 + 0 + 0.5) / 3)
    assert found.per_token == found.rate  # answers of one length: a token orders them as the sums do
    assert agreement(parent, parent, groups, pad=0).rate == 0.5  # no move at all: every pair a tie


def test_the_step_from_the_parent_is_the_mean_kl_of_the_policys_own_answers(tiny_store: ModelStore) -> None:
    parent, _ = load_causal_lm(tiny_store.path("v0001"))
    policy, _ = load_causal_lm(tiny_store.path("v0001"))
    bias = torch.zeros(policy.config.vocab_size)
    bias[30] = 3.0
    original = policy.lm_head.forward
    policy.lm_head.forward = lambda hidden: original(hidden) + bias  # type: ignore[method-assign]
    # A prompt longer than its answer and one shorter; an empty answer, which has no token to read, left out.
    queries, responses = [list(range(5, 15)), [5]], [[30, 2], [30, 31, 40, 2]]
    answers = Answers("k", [*queries, [6, 7]], [*responses, []], [False] * 3, ["a", "b", ""], [0.0] * 3)
    assert step_kl(parent, parent, answers, pad=0, batch=2) == 0.0
    # By the bias alone, at each answer position: log pi(t) - log parent(t) = bias[t] - log(1 + p30 (e^3 - 1)),
    # p30 the parent's probability of token 30 there (read off one whole forward of the parent).
    expected = []
    for query, response in zip(queries, responses, strict=True):
        with torch.no_grad():
            logits = parent(torch.tensor([query + response])).logits[0, len(query) - 1 : -1]
        p30 = torch.softmax(logits.float(), dim=-1)[:, 30]
        expected.append(float(bias[response].sum() - torch.log1p(p30 * (math.e**3 - 1)).sum()))
    for batch in (1, 2, 8):  # one answer a batch, both in one, and a batch larger than the answers
        assert step_kl(policy, parent, answers, pad=0, batch=batch) == pytest.approx(sum(expected) / 2, rel=1e-5)
    only_empty = Answers("k", [[6, 7]], [[]], [False], [""], [0.0])
    assert math.isnan(step_kl(policy, parent, only_empty, pad=0))


def test_detrending_takes_out_what_length_alone_predicts() -> None:
    # Summed log-ratios -3, -6, 2 over answers of 1, 2 and 4 tokens: -7 over 7 tokens, -1 a token on average.
    shift, lengths = torch.tensor([-3.0, -6.0, 2.0]), torch.tensor([1.0, 2.0, 4.0])
    assert detrended(shift, lengths).tolist() == [-2.0, -4.0, 6.0]
    # A policy that only drifted (the same shift a token everywhere) moved no answer beyond its length.
    drift = -0.5 * torch.tensor([3.0, 10.0, 41.0])
    assert detrended(drift, torch.tensor([3.0, 10.0, 41.0])).tolist() == [0.0, 0.0, 0.0]


def test_a_drift_the_same_a_token_agrees_with_half_the_pairs_per_token_whatever_the_lengths() -> None:
    # Summed log-ratios -3, -6, 2 over answers of 1, 2 and 4 tokens: -3, -3 and 0.5 a token.
    assert per_token(torch.tensor([-3.0, -6.0, 2.0]), torch.tensor([1.0, 2.0, 4.0])).tolist() == [-3.0, -3.0, 0.5]
    # Users preferred the longer answer of both pairs (2 over 0, 1 over 0). A policy that only drifted, 0.5 a token
    # less likely everywhere: the summed shifts side with the shorter answer every time, the per-token ones tie.
    lengths = torch.tensor([3.0, 10.0, 41.0])
    drift, judged = -0.5 * lengths, [(2, 0), (1, 0)]
    assert share_agreeing(drift, judged) == 0.0
    assert share_agreeing(per_token(drift, lengths), judged) == 0.5
    # One that made the preferred answers' tokens likelier, by 0.1 a token on top of the drift, agrees per token.
    learned = drift + torch.tensor([0.0, 0.1 * 10, 0.1 * 41])
    assert share_agreeing(learned, judged) == 0.0 and share_agreeing(per_token(learned, lengths), judged) == 1.0


def test_agreement_runs_the_shared_lower_layers_once_and_finds_the_same_shifts(tiny_store: ModelStore) -> None:
    """A round's policy (LoRA on the upper layer, stored merged and rounded) against its parent (adapters off):
    the split pass gives the whole pass's agreement, on prompts longer and shorter than their answers."""
    torch.manual_seed(3)  # the adapters' initialisation, and the weights below: the same model in every run
    policy, _ = load_causal_lm(tiny_store.path("v0001"), LoraOptions(dropout=0.0), train_layers=1)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)  # adapters that moved: the policy differs from its parent
            elif "lora_" not in name:
                if weight.dim() > 1:  # seeded here: the store's tiny llama is drawn anew in every run
                    weight.normal_(0.0, 0.1)
                weight.copy_(weight.to(torch.bfloat16).float())  # stored versions are bf16: the lower layers survive
    stored, parent = as_stored(policy), AdapterOff(policy)
    assert layers.same_lower(backbone(stored), backbone(parent), 1)
    long_prompt, short_prompt = list(range(5, 17)), [5]
    prompts = [long_prompt, short_prompt] * 6
    groups = [
        RankedGroup(
            f"g{i}", [[*p, 20 + i, 21, 2], [*p, 30 + i, 31, 32, 33, 34, 2]], [[i % 2], [1 - i % 2]], answer_lens=(3, 6)
        )
        for i, p in enumerate(prompts)
    ]
    # The reference: the parent's weights again, as a second model (not the parent object, so both are run).
    whole = agreement(stored, parent, groups, pad=0, batch=2, reference=AdapterOff(policy))
    split = agreement(stored, parent, groups, pad=0, batch=2, split=1, reference=AdapterOff(policy))
    assert split == whole and whole.pairs == 12 and whole.rate not in (0.5, 1.0, 0.0)
    assert whole.reference == whole.per_token
    # A reference whose lower layers differ (the store's v0001, not re-drawn) runs whole; the parent keeps the split.
    other, _ = load_causal_lm(tiny_store.path("v0001"))
    assert not layers.same_lower(backbone(stored), backbone(other), 1)
    mixed = agreement(stored, parent, groups, pad=0, batch=2, split=1, reference=other)
    assert mixed == agreement(stored, parent, groups, pad=0, batch=2, reference=other)
    assert mixed.per_token == whole.per_token and mixed.reference != whole.reference


# -- a reward model that loves empty answers ----------------------------------------------------------------------


class LovesEmpty(RewardScorer):
    """A scripted reward model: the fewer tokens the better, an answer of the end-of-turn token alone best."""

    def from_hidden(self, hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
        return 1.0 - packed.lengths.float()


@pytest.mark.usefixtures("redis_server")
def test_a_version_that_answers_empty_for_its_reward_model_is_not_promoted(
    tmp_path: Path, redis_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from learn.daemon import Learner

    monkeypatch.setattr("learn.ppo_run.RewardScorer", LovesEmpty)
    # The tiny llama taught to end its answers after 1 to 12 words: ending at once is a step away.
    prompts = [f"write a short poem about the sea {i}" for i in range(30)]
    data = make_data_dir(tmp_path, policy=tiny_teachable_folder(tmp_path / "teachable", prompts))
    settings = load_settings(
        data_dir=data,
        redis_url=redis_server.url,
        learn_threads=1,
        learn_auto_promote=True,
        learn_min_agreement_pairs=0,
        learn_min_agreement=0.0,
    )
    config = RoundConfig(
        iterations=16,
        prompts_per_iteration=8,
        max_new_tokens=8,
        lr=1e-2,
        value_lr=1e-4,
        rollouts="sampled",
        train_layers=0,
        ppo=PPOConfig(ptx_coef=0.5, epochs=4),
    )
    result = ppo_round(
        settings, config, PPOOptions(prompt_file=tmp_path / "prompts.jsonl", eval_samples=2), show_progress=False
    )
    # PPO did what its reward model asked: shorter answers, many of them empty, a higher mean reward ...
    assert result.after.empty >= 0.25 > result.before.empty, (result.before, result.after)
    assert result.after.reward > result.before.reward
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    registry = Registry(client)
    registry.register("v0001", None, "import", 0.0, {})
    registry.switch("v0001", None, "promote", "test", "start")
    outcome = Learner(settings, client)._finish(result)
    # ... and the gate, which the reward model alone would have passed, refuses it: it stays `ready`.
    assert outcome == "ready v0002"
    assert registry.current()[0] == "v0001"
    # Strict JSON, as the operator console serves it: the replaced version's step (not measured) is null, not NaN.
    status = json.loads(client.get("rankloop:learner:status"), parse_constant=refuse)
    assert status["last_round"]["before"]["parent_kl"] is None
    assert status["last_round"]["after"]["parent_kl"] == result.after.parent_kl
    for line in (settings.data_dir / "runs" / "rounds.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    assert "of its answers are empty (the current version: 0%)" in status["last_round"]["gate"]


def refuse(constant: str) -> None:
    raise AssertionError(f"{constant} in what should be JSON")
