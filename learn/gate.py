"""The learner's two verdicts, as pure functions of measured figures: may a reward model steer a PPO round, and
may a new version replace the one users are served.

The second must not rest on the reward model PPO just optimised against: a policy finds what that model never saw
(empty and tiny answers, which the served version never wrote and so no ranking punished) and the same model then
scores the result high. So the version must also (1) not answer empty, loop or get cut more often than the
version it replaces, nor collapse its answers' length, whatever any model says (learn.degenerate); (2) stay within
a KL budget of the SFT reference, and have moved from its parent at all (a version that did not is its parent
again, whatever a test of chance says of it); (3) agree with held-out rankings that neither the reward model nor PPO
saw (learn.policy_eval.Agreement), beyond chance, relative to the version it would replace (its parent, or the served
version a chain of rounds built on; read against the SFT reference, its own step may also not go back beyond
chance); (4) not score lower on the reward model beyond the noise of its evaluation; and (5) stay as fluent on
held-out text as the reference. A version refused for want of evidence alone is `undecided`: the learner may build
on it (learn.daemon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from learn.policy_eval import Agreement, AgreementBy, IntervalOf, PolicyEval
from learn.reward_model import Evaluation
from learn.winrate import Z95

# The gate's readings of agreement, in its verdicts' words.
READINGS: dict[AgreementBy, str] = {
    "per_token": "per token",
    "sum": "summed",
    "reference": "per token since the reference",
}


@dataclass(frozen=True)
class Gate:
    passed: bool
    why: str
    # Refused for want of evidence alone: every other check passed, its share of held-out pairs is above half, and
    # more pairs could still pass it (too few pairs or rankings to judge, or a 95% interval that reaches the bar).
    # The learner may build its next round on such a version (`RANKLOOP_LEARN_BUILD_ON=undecided`) rather than throw
    # its round away.
    undecided: bool = False


@dataclass(frozen=True)
class Limits:
    max_ptx_ratio: float = 1.1  # held-out LM loss at most this times the reference's
    max_kl: float = 30.0  # per-answer KL to the reference (nats)
    # Per-answer KL to the parent at least this (nats): a version that hardly moved is its parent written again,
    # and its agreement with held-out rankings is a coin's. Measured on SmolLM2's answers: with the score zeroed
    # (and the ptx term as KL to the reference) rounds moved -0.07 and 0.09; with the score, 0.88 to 11.4, and the
    # smallest of those wins 67.5% over v0001 (BENCHMARKS.md, `step-kl-reading`).
    min_step_kl: float = 0.5
    min_agreement: float = 0.55
    min_agreement_pairs: int = 20
    # Which share of held-out pairs agreement is: `per_token`, on each answer's log-ratio a token to the version it
    # would replace (its parent, or the served version a chain of rounds built on);
    # `sum`, on the summed log-ratio, which falls with length for a policy that only drifted and so sides with the
    # shorter answer of a pair whatever the policy learned (BENCHMARKS.md, `agreement_bias`); `reference`, a token
    # on the log-ratio to the SFT reference, what every round so far learned together, with the step from the
    # parent checked only for going back.
    agreement_by: AgreementBy = "per_token"
    # Beyond chance by the spread of the rankings the pairs come from, or (`pairs`) with the pairs taken as
    # independent, which a ranking's pairs are not (learn.winrate.grouped_interval).
    agreement_interval: IntervalOf = "pairs"
    empty_rise: float = 0.02  # shares may rise by at most this much over the replaced version's
    degenerate_rise: float = 0.05
    truncated_rise: float = 0.2
    min_length_ratio: float = 0.5  # mean answer length at least this times the replaced version's
    # Caps over every round: rises alone would let ten rounds reach 20% empty answers.
    max_empty: float = 0.02
    max_degenerate: float = 0.1


def rm_gate(evaluation: Evaluation, min_accuracy: float, min_pairs: int) -> Gate:
    """A reward model may steer a PPO round when its held-out accuracy is high enough, measured on enough pairs.

    Why the pair count: on a couple of held-out prompts the accuracy is a coin toss (on 8 pairs one answer more or
    less moves it by 0.125), and a PPO round steered by a reward model no better than chance costs minutes and
    teaches nothing. Later rounds measure on the held-out prompts of all rounds so far (the newest 64), so the count
    grows.
    """
    accuracy = evaluation.accuracy
    if evaluation.pairs < min_pairs:
        return Gate(
            False, f"held-out accuracy {accuracy:.3f} measured on {evaluation.pairs} pairs, fewer than {min_pairs}"
        )
    if not accuracy >= min_accuracy:  # NaN (no held-out pairs yet) does not pass either
        return Gate(False, f"held-out accuracy {accuracy:.3f} < {min_accuracy} ({evaluation.pairs} pairs)")
    return Gate(True, f"held-out accuracy {accuracy:.3f} on {evaluation.pairs} pairs")


def _shares(before: PolicyEval, after: PolicyEval, limits: Limits) -> Gate | None:
    checks = (
        ("empty", after.empty, before.empty, limits.empty_rise),
        ("empty or looping", after.degenerate, before.degenerate, limits.degenerate_rise),
        ("cut by the length limit", after.truncated, before.truncated, limits.truncated_rise),
    )
    for what, now, was, rise in checks:
        if not now <= was + rise:  # written so that NaN (no answers measured) fails too
            return Gate(False, f"{now:.0%} of its answers are {what} (the current version: {was:.0%})")
    # Above its cap a share may not rise at all (a base model that loops more often than the cap can still be
    # improved on, but never made worse one round at a time).
    for what, now, was, cap in (
        ("empty", after.empty, before.empty, limits.max_empty),
        ("empty or looping", after.degenerate, before.degenerate, limits.max_degenerate),
    ):
        if not now <= max(cap, was):
            return Gate(
                False,
                f"{now:.0%} of its answers are {what} (the cap: {cap:.0%}, or the current "
                f"version's {was:.0%} where higher)",
            )
    if not after.answer_length >= limits.min_length_ratio * before.answer_length:
        return Gate(
            False,
            f"its answers collapsed to {after.answer_length:.1f} tokens on average (the current "
            f"version: {before.answer_length:.1f})",
        )
    return None


def _of_rankings(agreement: Agreement, limits: Limits) -> str:
    """How the interval in a verdict was measured, where it was by the rankings."""
    return f", by their {agreement.groups} rankings" if limits.agreement_interval == "rankings" else ""


def _went_back(agreement: Agreement, limits: Limits) -> Gate | None:
    """Read against the reference, a version could undo some of what the version it would replace learned and still
    agree with most pairs: its own step, a token against that version (its parent, or the served version of a
    chain), may not go against users' rankings beyond chance. A small step (above the floor of
    `Limits.min_step_kl`) sits near half and passes, so that rounds may add small real steps to big ones."""
    if limits.agreement_by != "reference":
        return None
    step = agreement.per_token
    _, high = agreement.interval("per_token", limits.agreement_interval)
    if not high >= 0.5:  # NaN (the step not measured) fails too
        return Gate(
            False,
            f"against its parent it agrees with {step:.0%} of {agreement.pairs} held-out ranked pairs a token, "
            f"below half beyond chance (95% high {high:.0%}{_of_rankings(agreement, limits)}): it went back on what "
            "users preferred",
        )
    return None


def _evidence(agreement: Agreement, limits: Limits) -> Gate | None:
    """Agreement with held-out rankings beyond chance: a refusal that says why, or None where it is."""
    if agreement.pairs < limits.min_agreement_pairs:
        return Gate(
            False,
            f"only {agreement.pairs} held-out ranked pairs to check it against users (fewer than "
            f"{limits.min_agreement_pairs})",
        )
    share = agreement.share(limits.agreement_by)
    if math.isnan(share):  # pairs were judged, but not this way (a caller that left the share unset)
        return Gate(False, f"no agreement {READINGS[limits.agreement_by]} measured on its held-out pairs")
    since = " since the reference" if limits.agreement_by == "reference" else ""
    if not share >= limits.min_agreement:
        return Gate(
            False,
            f"it agrees with {share:.0%} of {agreement.pairs} held-out ranked pairs{since} (below "
            f"{limits.min_agreement:.0%})",
        )
    if limits.agreement_interval == "rankings" and agreement.groups < 2:
        return Gate(
            False,
            f"its {agreement.pairs} held-out ranked pairs come from {agreement.groups} ranking(s), too few to "
            "measure how much they vary",
        )
    low, _ = agreement.interval(limits.agreement_by, limits.agreement_interval)
    if not low > 0.5:  # a coin gives 55% or more of 20 pairs 41% of the time; NaN (under 2 rankings) fails too
        return Gate(
            False,
            f"it agrees with {share:.0%} of {agreement.pairs} held-out ranked pairs{since}, not beyond chance "
            f"(95% low {low:.0%}{_of_rankings(agreement, limits)})",
        )
    return None


def _could_pass(agreement: Agreement, limits: Limits) -> bool:
    """Whether more held-out pairs could still get a version its agreement refused through: users' pairs lean its
    way, and there are too few to judge, or the share's 95% interval still reaches the bar (53% of 2000 pairs does
    not reach 55%: more pairs would only confirm the refusal)."""
    share = agreement.share(limits.agreement_by)
    if not share > 0.5:  # NaN (no pairs) does not lean either
        return False
    if agreement.pairs < limits.min_agreement_pairs:
        return True
    _, high = agreement.interval(limits.agreement_by, limits.agreement_interval)
    return not high < limits.min_agreement  # NaN: too few rankings to measure a spread yet


def _reward_and_fluency(
    before: PolicyEval, after: PolicyEval, limits: Limits, reference_ptx: float | None
) -> Gate | None:
    """The reward model's word against a version, and its fluency on held-out text: a refusal, or None."""
    # The reward model's word counts against a version only where it is beyond the noise of two small samples'
    # means: 16 answers of spread 3 put a mean anywhere within ±1.5 of its value (95%), so "not higher" refused
    # better versions by chance. Users' held-out rankings (above) are the evidence for; this is a check against.
    noise = Z95 * math.hypot(before.reward_se, after.reward_se)
    if not after.reward >= before.reward - noise:
        return Gate(
            False,
            f"mean reward {after.reward:.3f} is below the current version's {before.reward:.3f} "
            f"beyond its noise (±{noise:.3f})",
        )
    fluency = reference_ptx if reference_ptx is not None else before.ptx_loss
    if fluency is not None and after.ptx_loss is not None and not after.ptx_loss <= limits.max_ptx_ratio * fluency:
        return Gate(
            False,
            f"held-out LM loss {after.ptx_loss:.3f} exceeds {limits.max_ptx_ratio}x the reference's {fluency:.3f}",
        )
    return None


def promotion_gate(
    before: PolicyEval, after: PolicyEval, agreement: Agreement, limits: Limits, reference_ptx: float | None = None
) -> Gate:
    """May `after` replace `before` (the version users are served)? The first check that fails says why."""
    degenerate = _shares(before, after, limits)
    if degenerate is not None:
        return degenerate
    if not after.kl <= limits.max_kl:
        return Gate(False, f"KL to the reference {after.kl:.1f} exceeds the budget of {limits.max_kl:g}")
    # NaN (the step not measured) fails too; a floor of 0 is none (a step a little below 0 is noise about 0).
    if limits.min_step_kl > 0 and not after.parent_kl >= limits.min_step_kl:
        return Gate(
            False,
            f"it hardly moved from its parent (KL {after.parent_kl:.2f} nats an answer, below "
            f"{limits.min_step_kl:g}): nothing new to serve",
        )
    evidence = _evidence(agreement, limits)
    others = _went_back(agreement, limits) or _reward_and_fluency(before, after, limits, reference_ptx)
    if evidence is not None:  # refused for want of evidence; undecided where nothing else refuses it
        return Gate(False, evidence.why, undecided=others is None and _could_pass(agreement, limits))
    if others is not None:
        return others
    share = agreement.share(limits.agreement_by)
    since = " since the reference" if limits.agreement_by == "reference" else ""
    why = (
        f"mean reward {before.reward:.3f} → {after.reward:.3f}, agrees with {share:.0%} of "
        f"{agreement.pairs} held-out ranked pairs{since}, {after.empty:.0%} empty, KL {after.kl:.1f}"
    )
    return Gate(True, why)
