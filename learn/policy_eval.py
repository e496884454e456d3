"""How good a policy is on held-out prompts: the reward model's mean score of its answers, its KL to the SFT
reference, its LM loss on held-out text, its share of empty, looping and cut answers, a few samples to read; and
how well it agrees with held-out rankings the reward model never saw.

The same prompts and sampling seeds serve every policy evaluated, so two versions' figures differ by the policy
alone. A version's sampled answers and its held-out LM loss are kept (`Caches`): the version a round replaces was
sampled and measured when it was made, and only the new reward model's scores of its answers are computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from deploy.durable import write_text_atomic
from feedback.ranking import pairs
from learn import degenerate, layers
from learn.data import Example
from learn.device import device_of
from learn.distributed import world
from learn.kept_logprobs import KEPT, Key, key_of
from learn.ppo import (
    Models,
    Rollouts,
    adapters_as_wrapped,
    answer_logprobs,
    backbone,
    lower_of,
    pack,
    ptx_logits,
    ptx_lower,
    sample,
)
from learn.prompts import Prompt
from learn.rm_data import RankedGroup
from learn.sft import collate
from learn.weights import pad_id
from learn.winrate import grouped_interval, outcome, share_low

log = logging.getLogger("rankloop.learner")
EVAL_SEED = 1234  # every version's evaluation answers are sampled from the same seeds


class Sampling(Protocol):
    """What sampling evaluation answers runs: a round's `Models`, or a served version and the reference alone."""

    @property
    def policy(self) -> Any: ...

    @property
    def reference(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def split(self) -> int: ...  # the policy's first trained layer: the reference computes the same ones below


@dataclass(frozen=True)
class PolicyEval:
    reward: float  # mean normalised reward-model score of the sampled answers
    kl: float  # mean per-answer KL to the reference (sum over the answer's tokens of log pi - log pi_ref)
    ptx_loss: float | None  # LM loss per token on held-out text; None without held-out text
    answer_length: float  # tokens
    answers: int
    samples: list[dict[str, str]]
    empty: float = 0.0  # share of answers with no text
    degenerate: float = 0.0  # share that are empty or loop (learn.degenerate)
    truncated: float = 0.0  # share cut by the length limit
    reward_se: float = 0.0  # standard error of `reward` (sample sd over sqrt(answers)): how far noise moves it
    # A round's new version: its mean per-answer KL to the parent it was trained from, on these answers (`step_kl`);
    # NaN where not measured (the version a round replaces).
    parent_kl: float = float("nan")

    def figures(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answers:
    """A policy's sampled answers to the evaluation prompts and what does not depend on the reward model."""

    key: str  # what they answer: `answers_key` of the prompts and the sampling
    queries: list[list[int]]
    responses: list[list[int]]
    truncated: list[bool]
    texts: list[str]
    kl: list[float]


def answers_key(prompts: Sequence[Prompt], max_new_tokens: int, per_prompt: int, seed: int) -> str:
    parts = [[p.ids for p in prompts], max_new_tokens, per_prompt, seed]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


class AnswerCache:
    """Sampled answers per version, in a folder (data_dir/evals/answers): one JSON file per version."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, version: str, key: str) -> Answers | None:
        path = self.folder / f"{version}.json"
        if not path.is_file():
            return None
        found = Answers(**json.loads(path.read_text()))
        return found if found.key == key else None

    def put(self, version: str, answers: Answers) -> None:
        if not world().main:  # several processes sample the same answers; one writes them
            return
        write_text_atomic(self.folder / f"{version}.json", json.dumps(asdict(answers)))


@torch.no_grad()
def sample_answers(
    models: Sampling,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    per_prompt: int = 2,
    seed: int = EVAL_SEED,
    batch: int = 16,
) -> Answers:
    """`per_prompt` answers to each prompt from the policy (fixed seeds), and their KL to the reference."""
    tokenizer, pad = models.tokenizer, pad_id(models.tokenizer)
    queries = [p.ids for p in prompts for _ in range(per_prompt)]
    responses: list[list[int]] = []
    truncated: list[bool] = []
    kls: list[float] = []
    for start in range(0, len(queries), batch):
        chunk = sample(
            models.policy,
            queries[start : start + batch],
            max_new_tokens,
            int(tokenizer.eos_token_id),
            pad,
            seed=seed + start,
        )
        kls += answer_kl(models, chunk, pad).tolist()
        responses += chunk.responses
        truncated += chunk.truncated
    texts = [str(tokenizer.decode(r, skip_special_tokens=True)) for r in responses]
    return Answers(answers_key(prompts, max_new_tokens, per_prompt, seed), queries, responses, truncated, texts, kls)


@torch.no_grad()
def measure(
    models: Models,
    prompts: Sequence[Prompt],
    answers: Answers,
    ptx_loss: float | None,
    batch: int = 8,
    n_samples: int = 3,
) -> PolicyEval:
    """The figures of a policy's answers, scored by the round's reward model (`models.scorer`, or the round's
    reward where there is none)."""
    pad, per_prompt = pad_id(models.tokenizer), max(1, len(answers.queries) // max(1, len(prompts)))
    device = device_of(models.policy)
    judge = models.scorer if models.scorer is not None else models.reward
    rewards: list[float] = []
    for start in range(0, len(answers.queries), batch):
        chunk = Rollouts(
            answers.queries[start : start + batch],
            answers.responses[start : start + batch],
            answers.truncated[start : start + batch],
        )
        rewards += judge(chunk, pack(chunk, pad).to(device), None).tolist()
    shares = degenerate.shares(answers.texts, answers.responses, answers.truncated)
    samples = [
        {"prompt": prompts[i].messages[-1]["content"], "answer": answers.texts[i * per_prompt]}
        for i in range(min(n_samples, len(prompts)))
    ]
    n = max(1, len(rewards))
    se = statistics.stdev(rewards) / math.sqrt(n) if len(rewards) > 1 else 0.0
    return PolicyEval(
        sum(rewards) / n,
        sum(answers.kl) / n,
        ptx_loss,
        sum(map(len, answers.responses)) / n,
        len(rewards),
        samples,
        shares.empty,
        shares.degenerate,
        shares.truncated,
        se,
    )


class LossCache:
    """Versions' held-out LM losses (data_dir/evals/lm_loss.json), by version and `loss_key` of the texts: the
    fluency check's texts stop changing once a loop has enough of them (learn.sources.PTX_HELD_OUT_MAX), and then
    the reference's and a parent's losses are read here instead of computed again each round."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _all(self) -> dict[str, float]:
        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: computed again, and written whole
            return {}
        return found if isinstance(found, dict) else {}

    def get(self, version: str, key: str) -> float | None:
        return self._all().get(f"{version}/{key}")

    def put(self, version: str, key: str, loss: float) -> None:
        if not world().main:
            return
        losses = self._all() | {f"{version}/{key}": loss}
        # A round from the command line may write beside the daemon's: one update may then be lost (or the file
        # read as unreadable), and is computed again; a cache that cannot be written costs time, never the round.
        try:
            write_text_atomic(self.path, json.dumps(losses, indent=0))
        except OSError as exc:
            log.warning("could not keep %s's held-out LM loss in %s (%s)", version, self.path, exc)


def loss_key(examples: Sequence[Example], model: Any) -> str:
    """What a held-out LM loss of `model` is computed on here: the texts, the device and the precision of the
    products (each moves the figure a little; a version's loss is compared with its parent's and the reference's in
    one frame)."""
    device = device_of(model).type
    parts = [[[e.input_ids, e.labels] for e in examples], device, torch.is_autocast_enabled(device)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Caches:
    """Where a round keeps what it already knows of a version: its sampled answers and its held-out LM loss."""

    answers: AnswerCache
    losses: LossCache

    @classmethod
    def under(cls, folder: Path) -> Caches:
        return cls(AnswerCache(folder / "answers"), LossCache(folder / "lm_loss.json"))


def evaluate_policy(
    models: Models,
    prompts: Sequence[Prompt],
    ptx_held: Sequence[Example],
    max_new_tokens: int,
    per_prompt: int = 2,
    seed: int = EVAL_SEED,
    caches: Caches | None = None,
    version: str | None = None,
) -> tuple[PolicyEval, Answers]:
    """The policy's figures: its answers sampled (or `version`'s taken from `caches`, when they hold answers to the
    same prompts), its LM loss on `ptx_held` (or `version`'s from `caches`); the policy is not changed."""
    key = answers_key(prompts, max_new_tokens, per_prompt, seed)
    found = caches.answers.get(version, key) if caches is not None and version is not None else None
    answers = found or sample_answers(models, prompts, max_new_tokens, per_prompt, seed)
    if caches is not None and version is not None and found is None:
        caches.answers.put(version, answers)
    known = (caches.losses, version) if caches is not None and version is not None else None
    ptx_loss = held_out_lm_loss(models.policy, models.tokenizer, ptx_held, known, models.split)
    return measure(models, prompts, answers, ptx_loss), answers


def held_out_lm_loss(
    model: Any,
    tokenizer: Any,
    ptx_held: Sequence[Example],
    known: tuple[LossCache, str] | None = None,
    split: int = 0,
) -> float | None:
    """The model's LM loss on `ptx_held` (`lm_loss_of`); `known`: (the cache, the model's version), where it is read
    if there and written if not."""
    if not ptx_held:
        return None
    key = loss_key(ptx_held, model)
    found = known[0].get(known[1], key) if known is not None else None
    if found is not None:
        return found
    loss = lm_loss_of(model, ptx_held, pad_id(tokenizer), split)
    if known is not None:
        known[0].put(known[1], key, loss)
    return loss


@torch.no_grad()
def lm_loss_of(model: Any, examples: Sequence[Example], pad: int, split: int = 0, batch: int = 8) -> float:
    """Mean loss per labelled token over `examples`, held-out text or answers (learn.sft.lm_loss over them all),
    computed for less: in batches of similar length, the LM head on the labelled tokens alone (a held-out text's
    prompt is most of it and is not scored), and below `split` from learn.lower_cache. Every version made here
    computes the reference's layers below its split, so a round's new version reads them where the reference's
    loss (or its parent's) computed them, and runs its trained layers alone."""
    model.eval()
    device = device_of(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, tokens = 0.0, 0
    for start in range(0, len(order), batch):
        found = collate([examples[i] for i in order[start : start + batch]], pad)
        ids = (found["input_ids"].to(device), found["attention_mask"].to(device), found["labels"].to(device))
        below = ptx_lower(model, split, ids) if split > 0 else None
        with adapters_as_wrapped(model) as inner:
            logits, targets = ptx_logits(inner, ids, split, below)
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        tokens += targets.numel()
    return total / max(1, tokens)


def answer_kl(models: Sampling, rollouts: Rollouts, pad: int) -> torch.Tensor:
    """(B,) KL of each answer to the reference: the sum of the per-token log-ratio over the answer. Below
    `models.split` the two compute the same layers (every version made here): those run once, for both."""
    if models.policy is models.reference:
        return torch.zeros(len(rollouts.responses))
    pairs = list(zip(rollouts.queries, rollouts.responses, strict=True))
    return _shifts(models.policy, [models.reference], pairs, pad, batch=len(pairs), split=models.split)[0]


@torch.no_grad()
def step_kl(policy: Any, parent: Any, answers: Answers, pad: int, split: int = 0, batch: int = 8) -> float:
    """How far a round moved the policy from its parent, whatever it moved it towards: the mean over the policy's
    own sampled answers of log pi - log pi_parent summed over each answer (an estimate of KL(pi || parent) an
    answer). The gate reads it to tell a version that changed from its parent written again: where the policy
    hardly moved, the signs of its log-ratios on held-out rankings are noise, and pairs of one ranking share them.
    Empty answers have no token to read and are left out; NaN where every answer is empty."""
    rollouts = [(query, answer) for query, answer in zip(answers.queries, answers.responses, strict=True) if answer]
    if not rollouts:
        return float("nan")
    (shift,) = _shifts(policy, [parent], rollouts, pad, batch, split)
    return float(shift.mean())


# Which share of held-out pairs the gate reads: on log-ratios a token to the version a new one would replace (its
# parent, or the served version a chain of rounds built on), or summed over each answer; or on log-ratios to the SFT
# reference a token (the steps of every round so far, not the newest alone).
AgreementBy = Literal["per_token", "sum", "reference"]
# What an agreement's interval counts as independent: the rankings its pairs come from, or the pairs themselves.
IntervalOf = Literal["rankings", "pairs"]


@dataclass(frozen=True)
class Agreement:
    """How a new policy moved on rankings it never trained on: the share of held-out ranked pairs whose preferred
    answer it made more likely, relative to its parent (in a chain of rounds: the served version it would replace),
    than the other (log pi/pi_parent summed over each answer).
    Neither the reward model nor PPO saw these rankings, so a policy that only fooled its reward model does not
    move them, and a policy that learned what users prefer does. `per_token`: the same share on each answer's
    log-ratio a token (`per_token()`), which drift alone leaves at half whatever the answers' lengths, the share the
    gate reads by default; `detrended`: the summed share less what each answer's length alone predicts
    (`detrended()`), recorded, not gated on (BENCHMARKS.md, `agreement_bias`); `reference`: the share a token on
    log pi/pi_reference, where the reference is the SFT model every round started from, so that it reads what all
    the rounds so far learned together (a version one small step from its parent sits near half against the parent
    whatever its ancestors learned)."""

    rate: float
    pairs: int
    detrended: float = float("nan")
    per_token: float = float("nan")  # the share on each answer's mean log-ratio a token (`per_token`)
    reference: float = float("nan")  # the same, on each answer's log-ratio to the SFT reference
    groups: int = 0  # the rankings the pairs come from
    # Each share's 95% interval by its rankings (learn.winrate.grouped_interval), where they were known.
    intervals: dict[AgreementBy, tuple[float, float]] = field(default_factory=dict)

    def share(self, by: AgreementBy) -> float:
        """The share the gate reads: a token against the parent or the reference, or summed (`rate`)."""
        return {"per_token": self.per_token, "reference": self.reference, "sum": self.rate}[by]

    def interval(self, by: AgreementBy, of: IntervalOf) -> tuple[float, float]:
        """The share's 95% interval: by the rankings its pairs came from (NaN where they are not known: nothing is
        then beyond chance), or with the pairs taken as independent (narrower than the data support: the pairs of
        one ranking move together)."""
        if of == "rankings":
            return self.intervals.get(by, (float("nan"), float("nan")))
        share = self.share(by)
        return share_low(share, self.pairs), 1.0 - share_low(1.0 - share, self.pairs)

    def figures(self) -> dict[str, float]:
        return {
            "agreement": self.rate,
            "agreement_pairs": float(self.pairs),
            "agreement_groups": float(self.groups),
            "agreement_detrended": self.detrended,
            "agreement_per_token": self.per_token,
            "agreement_reference": self.reference,
        } | {f"agreement_{by}_low": low for by, (low, _) in self.intervals.items()}


def detrended(shift: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each answer's log pi/pi_parent, summed over its tokens, less its length times the mean per-token shift of all
    the answers. Why look at it: a policy that moved makes its parent's own answers less likely by some amount a
    token on average, so the raw sums fall with length, and for a preference that follows length the shorter (or
    longer) answer of a pair looks preferred whatever the policy learned. Measured on `concise` runs it does not
    tell learning from drift either (a round with its reward zeroed: 0.558; one with it: 0.473), so the gate reads
    the share a token (`per_token`) instead."""
    mean_shift = shift.sum() / lengths.sum().clamp(min=1)  # a token, over all the answers
    return shift - mean_shift * lengths


@torch.no_grad()
def agreement(
    policy: Any,
    parent: Any,
    groups: Sequence[RankedGroup],
    pad: int,
    batch: int = 8,
    split: int = 0,
    reference: Any = None,
) -> Agreement:
    """`Agreement` of `policy` over `parent` (and over `reference`, where given) on ranked groups (ties count half;
    pairs without a preference none).

    Where the models compute the same layers below `split` (a round trains only the layers above it), those layers
    run once per batch for all; batches hold answers of similar length, so that little of the work is padding.
    """
    rollouts: list[tuple[list[int], list[int]]] = []
    index: dict[tuple[int, int], int] = {}
    for g, group in enumerate(groups):
        for a, (sequence, length) in enumerate(zip(group.answers, group.answer_lens, strict=False)):
            if 0 < length < len(sequence):  # the answer whole and some prompt before it
                index[(g, a)] = len(rollouts)
                rollouts.append((sequence[:-length], sequence[-length:]))
    # The first round's parent is the reference: one pass serves both.
    bases = [parent] if reference is None or reference is parent else [parent, reference]
    shifts = _shifts(policy, bases, rollouts, pad, batch, split)
    by_group = [
        [
            (index[g, chosen], index[g, rejected])
            for chosen, rejected in pairs(group.tiers)
            if (g, chosen) in index and (g, rejected) in index
        ]
        for g, group in enumerate(groups)
    ]
    judged = [pair for group in by_group for pair in group]
    lengths = torch.tensor([len(answer) for _, answer in rollouts], dtype=shifts[0].dtype)
    readings: dict[AgreementBy, torch.Tensor] = {"sum": shifts[0], "per_token": per_token(shifts[0], lengths)}
    if reference is not None:
        readings["reference"] = per_token(shifts[-1], lengths)
    return Agreement(
        share_agreeing(readings["sum"], judged),
        len(judged),
        share_agreeing(detrended(shifts[0], lengths), judged),
        share_agreeing(readings["per_token"], judged),
        share_agreeing(readings["reference"], judged) if reference is not None else float("nan"),
        sum(1 for group in by_group if group),
        {by: grouped_interval([outcomes(shift, group) for group in by_group]) for by, shift in readings.items()},
    )


def _shifts(
    policy: Any, bases: list[Any], rollouts: list[tuple[list[int], list[int]]], pad: int, batch: int, split: int
) -> list[torch.Tensor]:
    """Each answer's log pi/pi_base summed over its tokens, one (N,) tensor per base model.

    A frozen model's log-probabilities of an answer it read before are taken from learn.kept_logprobs; the others
    are computed in batches of similar length. Below `split` the layers run once per batch, for the policy and
    every base that computes the same ones (a base that does not, a reference after a full fine-tuning round, runs
    whole); each model then runs its upper layers on the rows it lacks."""
    models = [policy, *bases]
    kept = [_kept(model, rollouts) for model in models]
    todo = [i for i in range(len(rollouts)) if any(found[i] is None for _, found in kept)]
    if todo:
        _compute(models, kept, [rollouts[i] for i in todo], todo, pad, batch, split)
    mine = kept[0][1]
    return [
        torch.tensor([float((a - b).sum()) for a, b in zip(mine, theirs, strict=True)], dtype=torch.float32)
        for _, theirs in kept[1:]
    ]


def _compute(
    models: list[Any],
    kept: list[tuple[list[Key | None], list[Any]]],
    chosen: list[tuple[list[int], list[int]]],
    todo: list[int],
    pad: int,
    batch: int,
    split: int,
) -> None:
    """Fill in `kept` (each model's keys and log-probabilities) at the answers `chosen` (at positions `todo`) that
    some model lacks; the first model is the policy, whose lower layers the others may share."""
    policy = models[0]
    shared = [split > 0 and layers.same_lower(backbone(policy), backbone(m), split) for m in models]
    packed = pack(Rollouts([q for q, _ in chosen], [r for _, r in chosen], [False] * len(chosen)), pad)
    for rows in packed.by_length(batch):
        sub = packed.rows(rows).to(device_of(policy))
        lacking = [[j for j, r in enumerate(rows) if found[todo[r]] is None] for _, found in kept]
        below = lower_of(policy, split, sub) if any(s and n for s, n in zip(shared, lacking, strict=True)) else None
        for model, same, need, (keys, found) in zip(models, shared, lacking, kept, strict=True):
            if not need:
                continue
            part = sub if len(need) == len(rows) else sub.rows(need)
            start = below[need, : part.width] if same and below is not None else None
            computed = answer_logprobs(model, part, split if start is not None else 0, start).cpu()
            for k, j in enumerate(need):
                i = todo[rows[j]]
                found[i] = answer = computed[k, : len(chosen[rows[j]][1])]
                key = keys[i]
                if key is not None:
                    KEPT.put(key, answer)


def _kept(model: Any, rollouts: list[tuple[list[int], list[int]]]) -> tuple[list[Key | None], list[Any]]:
    """Each answer's key in learn.kept_logprobs (None where the model is not frozen) and what is kept of it."""
    fingerprint = KEPT.print_of(model)
    if fingerprint is None:
        return [None] * len(rollouts), [None] * len(rollouts)
    device = device_of(model)
    keys: list[Key | None] = [key_of(fingerprint, device, q, r) for q, r in rollouts]
    return keys, [KEPT.get(key) if key is not None else None for key in keys]


def per_token(shift: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each answer's log pi/pi_base a token (the base: the parent, or the reference): its summed shift over its
    length. A policy that only drifted makes its parent's answers less likely by about the same amount a token, so
    the sums fall with length and the means do not; a policy that learned moves the tokens users preferred, in
    short answers and long ones alike."""
    return shift / lengths.clamp(min=1)


def outcomes(shift: torch.Tensor, judged: Sequence[tuple[int, int]]) -> list[float]:
    """Per (preferred, other) answer pair: 1 where `shift` moved the preferred one further, 0.5 for a tie, else 0."""
    return [outcome(float(shift[chosen]), float(shift[other])) for chosen, other in judged]


def share_agreeing(shift: torch.Tensor, judged: Sequence[tuple[int, int]]) -> float:
    """The share of (preferred, other) answer pairs whose preferred one `shift` moved further (ties count half)."""
    found = outcomes(shift, judged)
    return sum(found) / len(found) if found else float("nan")
