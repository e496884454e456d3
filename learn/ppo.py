"""One PPO iteration on a batch of rollouts: score, penalise KL to the reference, GAE (or RLOO's leave-one-out
baseline), clipped updates, ptx.

Objective (InstructGPT): E[r(x,y) - beta * log(pi(y|x) / pi_ref(y|x))] + ptx_coef * E_pretrain[log pi(x)]
(the paper calls the last weight gamma; here gamma is only the per-token discount of GAE).
The step only calls the models and learn.rl_math; the rollouts, the reward and the value model are passed in, so
the same step serves answers users ranked (written by the served version) and answers sampled just now.

Two frames, and one place that maps between them. The models see prompt + answer sequences, (B, L) (the sequence
frame); the math sees answers only, (B, A) (the answer frame of learn.rl_math: column j is the answer's token j).
The logits at sequence position len(prompt) - 1 + j predict answer token j, so that is where token j's
log-probability and the value of the state before it are read: `Packed.predictors` holds those positions, and
`Packed.answers` / `select` / `scatter` are the only code that crosses between the frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from learn import layers, lower_cache, rl_math
from learn.data import IGNORE, by_length
from learn.device import device_of
from learn.distributed import sum_gradients, total, world


@dataclass(frozen=True)
class PPOConfig:
    gamma: float = 1.0  # discount (per token)
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2
    value_coef: float = 0.1
    ptx_coef: float = 0.0  # weight of the pre-training LM loss in the objective
    epochs: int = 4  # passes over the batch
    minibatch: int = 4  # rollouts per optimiser step
    truncation_penalty: float = 0.0  # added to the score of answers the length limit cut off
    max_grad_norm: float = 1.0
    seed: int = 0  # order of the mini-batches
    # `gae`: per-token advantages from the value model (GAE, whitened over the batch); `rloo`: each answer's
    # KL-penalised return less its siblings' mean (the other answers to its prompt), the same for all its tokens,
    # with no value model (`score`).
    advantage: Literal["gae", "rloo"] = "gae"
    # Where the clip is centred on answers another version wrote: `served`, that version (no gradient pushes a sampled
    # token further once its probability is past 1 ± clip of the writer's, however many iterations); `iteration`,
    # the policy at the start of each iteration, the answers weighted by its probability over the writer's
    # (decoupled PPO).
    clip_centre: Literal["served", "iteration"] = "iteration"
    # The least the advantages are divided by, as a share of the reward model's score spread (learn.reward_model.Norm):
    # whitening alone scales any batch to unit variance, so a reward that says nothing (a flat reward model, the score
    # replaced by 0) would still move the policy as far as one that ranks; 0 whitens as before.
    advantage_floor: float = 0.0
    # The ptx term's loss: `lm`, the LM loss of its texts' tokens; `reference_kl`, KL(ref || pi) of each next token
    # on them (rl_math.reference_kl), for texts the reference wrote itself, whose LM loss it is in expectation.
    # None: `reference_kl` on the reference's own answers, `lm` on other texts (learn.ppo_run.RoundConfig.for_ptx).
    ptx_loss: Literal["lm", "reference_kl"] | None = None

    def steps(self, rollouts: int) -> int:
        """Optimiser steps `update` takes over an iteration of `rollouts`: every epoch, its mini-batches."""
        return self.epochs * -(-rollouts // self.minibatch)


@dataclass(frozen=True)
class Rollouts:
    queries: list[list[int]]
    responses: list[list[int]]
    truncated: list[bool]


@dataclass(frozen=True)
class Packed:
    """Rollouts as model input (sequence frame) and where each answer token sits in it (answer frame).

    input_ids, attention_mask, position_ids: (B, L), prompt + answer, padded on one side (positions count real
    tokens only, so both sides give the same positions). answer_ids, mask: (B, A), each answer from column 0, mask
    1…1 0…0. predictors: (B, A), the sequence position whose next-token logits predict answer token j; 0 outside.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    answer_ids: Tensor
    mask: Tensor
    predictors: Tensor

    def answers(self, per_position: Tensor) -> Tensor:
        """(B, L, ...) sequence frame -> (B, A, ...) answer frame, zero where `mask` is 0."""
        rows = torch.arange(self.predictors.shape[0], device=per_position.device)[:, None]
        picked = per_position[rows, self.predictors.to(per_position.device)]
        keep = self.mask.to(picked.device, picked.dtype).reshape(*self.mask.shape, *([1] * (picked.dim() - 2)))
        return picked * keep

    def answer_positions(self) -> Tensor:
        """(B, L) 1 at the sequence positions that hold answer tokens (each predicted from the position before)."""
        mask = self.mask.to(self.attention_mask.device, self.attention_mask.dtype)
        # Outside the answers (mask 0) index 0, which exists however narrow the batch, adding nothing to it.
        positions = torch.where(mask.bool(), self.predictors.to(mask.device) + 1, 0)
        return torch.zeros_like(self.attention_mask).scatter_add_(1, positions, mask).clamp(max=1)

    def select(self, per_position: Tensor) -> Tensor:
        """(B, L, ...) -> (N, ...): the entries at the N answer tokens' predicting positions, row by row."""
        rows = torch.arange(self.predictors.shape[0], device=per_position.device)[:, None]
        return per_position[rows, self.predictors.to(per_position.device)][self.mask.bool().to(per_position.device)]

    def scatter(self, values: Tensor) -> Tensor:
        """(N,) one value per answer token, in `select`'s order -> (B, A), zero outside the answers."""
        out = torch.zeros(self.mask.shape, dtype=values.dtype, device=values.device)
        return out.masked_scatter(self.mask.bool().to(values.device), values)

    def rows(self, index: Sequence[int]) -> Packed:
        """The sub-batch of the given rows, without the padding none of them needs: right-padded sequences are cut
        after the longest of these rows (a left-padded batch keeps its width), answers after the longest answer."""
        rows = list(index)
        attention = self.attention_mask[rows]
        # The widths are shapes, so they are read on the host: two scalars a sub-batch, a deliberate sync on a GPU.
        right = bool((attention[:, 0] == 1).all())
        width = int(rl_math.last_real(attention).max()) + 1 if right else attention.shape[1]
        answers = max(1, int(self.mask[rows].sum(dim=1).max()))
        return Packed(
            self.input_ids[rows, :width],
            attention[:, :width],
            self.position_ids[rows, :width],
            self.answer_ids[rows, :answers],
            self.mask[rows, :answers],
            self.predictors[rows, :answers],
        )

    def to(self, device: torch.device | str) -> Packed:
        """The batch on `device`, where the models that read it are (once per batch, at the boundary)."""
        return Packed(*(t.to(device) for t in vars(self).values()))

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def by_length(self, size: int, rows: Sequence[int] | None = None) -> list[list[int]]:
        """The rows (all, or those given) in groups of `size` of similar sequence length (shortest first): passes
        over a group padded to its own longest row do less padded work than over the whole batch (on SmolLM2's
        answers, whose lengths run from a few tokens to the limit, about 40% less)."""
        lengths = self.attention_mask.sum(dim=1).tolist()
        chosen = list(range(len(lengths))) if rows is None else list(rows)
        return [[chosen[i] for i in group] for group in by_length([lengths[r] for r in chosen], size)]

    @property
    def lengths(self) -> Tensor:
        """(B,) tokens per answer."""
        return self.mask.sum(dim=1)


def pack(rollouts: Rollouts, pad_id: int, side: Literal["right", "left"] = "right") -> Packed:
    """The rollouts' sequences padded on `side`, and their answers cut out into the answer frame."""
    sequences = [q + r for q, r in zip(rollouts.queries, rollouts.responses, strict=True)]
    width, answer_width = max(map(len, sequences)), max(1, max(map(len, rollouts.responses)))
    b = len(sequences)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    answer_ids = torch.full((b, answer_width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, answer_width))
    predictors = torch.zeros((b, answer_width), dtype=torch.long)
    for row, (query, answer) in enumerate(zip(rollouts.queries, rollouts.responses, strict=True)):
        if not query:
            raise ValueError(f"rollout {row} has an empty prompt: nothing predicts its first answer token")
        start = 0 if side == "right" else width - len(query) - len(answer)
        ids[row, start : start + len(query) + len(answer)] = torch.tensor(query + answer, dtype=torch.long)
        attention[row, start : start + len(query) + len(answer)] = 1
        answer_ids[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
        mask[row, : len(answer)] = 1.0
        predictors[row, : len(answer)] = torch.arange(len(answer)) + start + len(query) - 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return Packed(ids, attention, positions, answer_ids, mask, predictors)


# -- the models ---------------------------------------------------------------------------------------------------


class AdapterOff:
    """A LoRA policy with its adapters switched off: the model the adapters were put on (the reference, or the
    version being replaced), without a second copy of the weights."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, **inputs: Tensor) -> Any:
        with self.model.disable_adapter():
            return self.model(**inputs)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        parameters: Iterator[torch.nn.Parameter] = self.model.parameters()
        return parameters

    def eval(self) -> AdapterOff:
        return self


def backbone(model: Any) -> Any:
    """The decoder stack of a model, of an AdapterOff's inner model too (the weights are the same)."""
    return layers.backbone_of(model.model if isinstance(model, AdapterOff) else model)


@contextmanager
def adapters_as_wrapped(model: Any) -> Iterator[Any]:
    """The model to run: an AdapterOff's inner model with its adapters off for the duration, else the model."""
    if isinstance(model, AdapterOff):
        with model.model.disable_adapter():
            yield model.model
    else:
        yield model


def causal_parts(model: Any) -> tuple[Any, Any]:
    """(backbone, LM head) of a causal LM, under a LoRA wrapper or not (the adapters stay in force)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return layers.backbone_of(model), inner.get_output_embeddings()


def _postprocessed_logits(model: Any) -> bool:
    return bool(getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None))


def lower_of(model: Any, split: int, packed: Packed) -> Tensor:
    """(B, L, H) the model's hidden states below layer `split` for this batch (frozen: no gradient)."""
    with torch.no_grad(), adapters_as_wrapped(model) as inner:
        return lower_cache.lower(
            layers.backbone_of(inner), split, packed.input_ids, packed.attention_mask, packed.position_ids
        )


def answer_logits(model: Any, packed: Packed, split: int = 0, below: Tensor | None = None) -> Tensor:
    """(N, V) fp32 next-token logits at the N answer tokens' predicting positions (`Packed.select` order).

    With `below` (this batch's `lower_of` the same lower weights) only the layers from `split` up run. The LM head
    runs on the answer positions only: the prompt's logits are never used, and the vocabulary-sized work on them
    (head, log-softmax, entropy) would be most of it, prompts being longer than answers.
    """
    with adapters_as_wrapped(model) as inner:
        if _postprocessed_logits(inner):
            out = inner(
                input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids
            )
            return packed.select(out.logits).float()
        backbone, head = causal_parts(inner)
        hidden = layers.final_hidden(
            backbone, split, packed.input_ids, packed.attention_mask, packed.position_ids, below
        )
        logits: Tensor = head(packed.select(hidden)).float()
        return logits


def logprobs_and_entropy(
    model: Any, packed: Packed, split: int = 0, below: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """((B, A) log-probability of each answer token, zero outside the answers; (N,) the entropy of the next-token
    distribution at each answer position, without gradient, in `Packed.select` order)."""
    logits = answer_logits(model, packed, split, below)
    picked, entropy = rl_math.token_logprobs_and_entropy(logits, _answer_tokens(packed, logits.device))
    return packed.scatter(picked), entropy


def answer_logprobs(model: Any, packed: Packed, split: int = 0, below: Tensor | None = None) -> Tensor:
    """(B, A) log-probabilities of each answer token under `model` (fp32), zero outside the answers."""
    logits = answer_logits(model, packed, split, below)
    return packed.scatter(rl_math.token_logprobs(logits, _answer_tokens(packed, logits.device)))


def _answer_tokens(packed: Packed, device: torch.device) -> Tensor:
    """(N,) the answer tokens, in `Packed.select` order: what the answer positions' logits predict."""
    return packed.answer_ids[packed.mask.bool()].to(device)


class ValueModel(torch.nn.Module):
    """Values from a frozen backbone's final hidden states through a trained linear head, one per answer token.

    Built on the reward model (learn.ppo_run.value_model): its backbone and its head, so that it starts out
    predicting the reward. The backbone stays frozen: a second trained backbone doubled the update's cost, and the
    reward model's features already describe what the value has to predict.
    """

    def __init__(self, backbone: Any, hidden_size: int, split: int = 0, shares_lower: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(hidden_size, 1)
        self.split, self.shares_lower = split, shares_lower

    @torch.no_grad()
    def hidden(self, packed: Packed, below: Tensor | None = None) -> Tensor:
        """(B, L, H) the backbone's final hidden states; `below` is used only where this backbone's lower layers
        are the policy's."""
        out: Tensor = layers.final_hidden(
            self.backbone,
            self.split,
            packed.input_ids,
            packed.attention_mask,
            packed.position_ids,
            below if self.shares_lower else None,
        )
        return out

    def features(self, packed: Packed, below: Tensor | None = None) -> Tensor:
        """(B, A, H) fp32 hidden states at the positions that predict each answer token (the state before it)."""
        return packed.answers(self.hidden(packed, below).float())

    def forward(self, features: Tensor) -> Tensor:
        """(B, A, H) -> (B, A) values (zero features, outside the answers, give the head's bias: mask them)."""
        out: Tensor = self.head(features).squeeze(-1)
        return out


# A pre-training batch, right-padded: (input_ids, attention_mask, labels with IGNORE outside the labelled tokens).
PtxBatch = tuple[Tensor, Tensor, Tensor]


# Scores of a batch of rollouts, (B,): given the rollouts, their packing and the policy's lower hidden states.
RewardFn = Callable[[Rollouts, Packed, Tensor | None], Tensor]


def sequence_reward(score: Callable[[list[list[int]]], Tensor]) -> RewardFn:
    """A reward over whole token sequences (prompt + answer), as scripted rewards in tests and controls are."""

    def reward(rollouts: Rollouts, packed: Packed, below: Tensor | None) -> Tensor:
        scores = score([q + r for q, r in zip(rollouts.queries, rollouts.responses, strict=True)])
        return scores.to(packed.input_ids.device)

    return reward


@dataclass
class Models:
    """What a PPO step runs. `behaviour` wrote the rollouts when they were not sampled from `policy` just now (the
    version users were served: the importance weights run from it). Below layer `split` the policy is
    frozen; `lower_shared` names the other models whose lower layers are the policy's, so that one `lower_of` per
    batch serves them too."""

    policy: Any
    reference: Any
    value: ValueModel
    reward: RewardFn
    tokenizer: Any
    behaviour: Any | None = None
    split: int = 0
    lower_shared: frozenset[str] = frozenset()
    scorer: Any | None = None  # the reward model itself, for evaluations (a control round's `reward` is zero)

    def below_for(self, name: str, below: Tensor) -> Tensor | None:
        return below if name in self.lower_shared else None


@dataclass(frozen=True)
class Scored:
    """One iteration's batch, scored before the update; per-token tensors (B, A) in the answer frame."""

    below: Tensor  # (B, L, H) the policy's lower hidden states (sequence frame), reused by every update pass
    old_logprobs: Tensor  # the writer's: the clip's centre (`served`), the weights' denominator (`iteration`)
    proximal_logprobs: Tensor  # under the policy at the start of the iteration (decoupled PPO's clip centre)
    features: Tensor  # (B, A, H) the value head's inputs
    values: Tensor
    scores: Tensor  # (B,) reward-model scores
    kl: Tensor  # the per-token KL penalty's estimate, log pi - log pi_ref at the sampled tokens
    kl_policy: Tensor  # the same weighted by pi / pi_old: an estimate of the policy's own KL to the reference
    advantages: Tensor
    returns: Tensor
    # What the advantages were divided by (their spread over the batch before whitening, or RLOO's root mean
    # square): near 0 where the rewards carry next to no signal, as with the score replaced by 0, where whitening
    # still turns what is left (the KL penalty, the value model's noise) into steps of full size.
    advantage_scale: float = 1.0
    advantage_floor: float = 0.0  # the least they were divided by (PPOConfig.advantage_floor times the spread)


SCORE_ROWS = 8  # rows per scoring pass: similar lengths together (Packed.by_length)


@torch.no_grad()
def score(models: Models, rollouts: Rollouts, packed: Packed, config: PPOConfig, beta: float) -> Scored:
    """Every model's view of the batch, computed once before the update, in groups of similar length; then the
    rewards, GAE and whitened advantages (or RLOO's, `answer_advantages`) over the whole batch.

    Of several processes (learn.distributed), each computes the rows it owns; the per-token figures are then summed
    over the processes, so that every process holds the whole batch's, and its rewards, GAE and whitening are the
    one-process ones. `below` and `features` stay with the rows' owner, the only one to update on them."""
    mask, split, processes = packed.mask, models.split, world()
    own = [r for r in range(mask.shape[0]) if processes.owns(r)]
    parts: dict[str, Tensor] = {}
    for rows in packed.by_length(SCORE_ROWS, own):
        sub = packed.rows(rows)
        below = lower_of(models.policy, split, sub)
        logprobs = answer_logprobs(models.policy, sub, split, below)
        old = logprobs
        if models.behaviour is not None:
            old = answer_logprobs(models.behaviour, sub, split, models.below_for("behaviour", below))
        # The behaviour policy is the reference itself in a round from the reference (the same weights).
        ref = (
            old
            if models.behaviour is models.reference
            else answer_logprobs(models.reference, sub, split, models.below_for("reference", below))
        )
        subset = Rollouts(
            [rollouts.queries[r] for r in rows],
            [rollouts.responses[r] for r in rows],
            [rollouts.truncated[r] for r in rows],
        )
        features, scores = _values_and_scores(models, subset, sub, below)
        found = {"below": below, "logprobs": logprobs, "old": old, "ref": ref, "features": features, "scores": scores}
        for name, value in found.items():
            _place(parts, name, value, rows, packed)
    values = models.value(parts["features"]) * mask
    if not processes.alone:
        owned = torch.zeros_like(mask)
        owned[own] = 1.0
        values = values * owned  # a row another process owns has no features here: its value comes from there
        for name in ("logprobs", "old", "ref", "scores"):
            total(parts[name])
        total(values)
    truncated = torch.tensor(rollouts.truncated, device=mask.device)
    # The KL penalty is the policy's now (it is what the update changes); for answers another version wrote, an
    # estimate on its samples.
    rewards, kl = rl_math.kl_penalty_rewards(
        parts["logprobs"], parts["ref"], mask, parts["scores"], beta, truncated, config.truncation_penalty
    )
    floor = config.advantage_floor * reward_spread(models)
    if config.advantage == "rloo":
        (advantages, scale), returns = answer_advantages(rollouts, rewards, mask, floor), values
    else:
        advantages, returns = rl_math.gae(rewards, values, mask, config.gamma, config.lam)
        scale = float(rl_math.masked_var(advantages, mask).sqrt())
        advantages = rl_math.whiten(advantages, mask, min_std=floor)
    # On answers another version wrote, E[log pi - log pi_ref] over its samples is not the policy's KL (with the
    # reference as writer it is minus KL(ref || pi), below 0): weighting each token by pi / pi_old makes it one.
    kl_policy = kl * rl_math.proximal_weights(parts["logprobs"], parts["old"], mask, cap=10.0)
    return Scored(
        parts["below"],
        parts["old"],
        parts["logprobs"],
        parts["features"],
        values,
        parts["scores"],
        kl,
        kl_policy,
        advantages,
        returns,
        scale,
        floor,
    )


def reward_spread(models: Models) -> float:
    """The spread of the reward model's scores (learn.reward_model.Norm), also in a control round whose score is 0;
    0 where the round has no saved reward model (no floor)."""
    norm = getattr(models.scorer, "norm", None)
    return float(norm.spread) if norm is not None else 0.0


def answer_advantages(rollouts: Rollouts, rewards: Tensor, mask: Tensor, floor: float = 0.0) -> tuple[Tensor, float]:
    """(B, A) RLOO's advantages: each answer's summed per-token rewards (its score less beta times its KL) less the
    mean of its siblings', on every one of its tokens, divided by their root mean square over the batch (as GAE's
    are whitened: the learning rate then means the same whatever the reward model's scale), or by `floor` where
    that is larger. Siblings are the rows with the same prompt: the K answers of a served comparison. Also returns
    that root mean square."""
    ids: dict[tuple[int, ...], int] = {}
    groups = torch.tensor([ids.setdefault(tuple(q), len(ids)) for q in rollouts.queries], device=mask.device)
    per_answer = rl_math.leave_one_out((rewards * mask).sum(dim=1), groups)
    mean_square = per_answer.pow(2).mean()
    per_answer = per_answer * torch.rsqrt(mean_square.clamp(min=floor**2) + 1e-8)
    return per_answer[:, None] * mask, float(mean_square.sqrt())


def _values_and_scores(models: Models, rollouts: Rollouts, packed: Packed, below: Tensor) -> tuple[Tensor, Tensor]:
    """The value head's features and the rewards; one pass of the reward model serves both where the value model
    is built on it (its `backbone`), as it is in a round."""
    if getattr(models.reward, "backbone", None) is models.value.backbone:
        hidden = models.value.hidden(packed, below)
        return packed.answers(hidden.float()), models.reward.from_hidden(hidden, packed).float()  # type: ignore[attr-defined]
    return models.value.features(packed, below), models.reward(rollouts, packed, below).float()


def _place(parts: dict[str, Tensor], name: str, value: Tensor, rows: list[int], packed: Packed) -> None:
    """Put a group's (rows, w, ...) result into the batch-wide tensor (B, W, ...), zero where the group had none."""
    if name not in parts:
        shape = (packed.mask.shape[0],)
        if value.dim() > 1:  # sequence frame (B, L, H) or answer frame (B, A[, H])
            width = packed.width if name == "below" else packed.mask.shape[1]
            shape = (*shape, width, *value.shape[2:])
        parts[name] = torch.zeros(shape, dtype=value.dtype, device=value.device)
    index = torch.tensor(rows, device=value.device)
    if value.dim() == 1:
        parts[name][index] = value
    else:
        parts[name][index, : value.shape[1]] = value


def ppo_step(
    models: Models,
    rollouts: Rollouts,
    config: PPOConfig,
    kl_controller: rl_math.AdaptiveKLController | rl_math.FixedKLController,
    optimizer: torch.optim.Optimizer,
    pad_id: int,
    ptx: Sequence[PtxBatch] = (),
) -> dict[str, float]:
    """One iteration: returns its metrics (reward, KL, beta, entropy, clip fraction, losses, answer length) and
    where its time went (`score_s`: log-probs, values and rewards; `update_s`: the epochs of mini-batches). `ptx`:
    the pre-training batches, one per optimiser step in turn (`update`)."""
    started = time.perf_counter()
    if len(rollouts.queries) < world().size:
        raise ValueError(f"{len(rollouts.queries)} rollouts for {world().size} processes: each needs one at least")
    packed = pack(rollouts, pad_id).to(device_of(models.policy))
    scored = score(models, rollouts, packed, config, kl_controller.value)
    scored_at = time.perf_counter()
    figures = update(models, packed, scored, config, optimizer, ptx)
    mask = packed.mask
    kl_per_answer = float(scored.kl_policy.sum(dim=1).mean())
    beta = kl_controller.value
    kl_controller.update(kl_per_answer, len(rollouts.queries))
    return {
        "reward": float(scored.scores.mean()),
        "kl_per_token": float(rl_math.masked_mean(scored.kl_policy, mask)),
        "kl_per_answer": kl_per_answer,
        "beta": beta,
        "advantage_scale": scored.advantage_scale,
        "advantage_floor": scored.advantage_floor,
        "answer_length": float(packed.lengths.float().mean()),
        "score_s": scored_at - started,
        "update_s": time.perf_counter() - scored_at,
        **figures,
    }


def update(
    models: Models,
    packed: Packed,
    scored: Scored,
    config: PPOConfig,
    optimizer: torch.optim.Optimizer,
    ptx: Sequence[PtxBatch] = (),
) -> dict[str, float]:
    """The epochs of clipped policy and value updates (and the ptx term) on a scored batch; mean figures.

    Optimiser step i adds the ptx term of `ptx[i % len(ptx)]`: the caller decides how many distinct pre-training
    batches an iteration reads and how large each is (learn.ppo_run.RoundConfig).

    Of several processes (learn.distributed), each takes the rows it owns of every mini-batch and its share of the
    ptx examples, each loss weighted by its share of the mini-batch's tokens (of the ptx batch's labelled tokens),
    and the gradients are summed: the one-process step. The figures are then this process's shares'."""
    # Figures stay tensors until the end: reading each on the host would wait for every mini-batch on a GPU.
    figures: dict[str, list[Tensor]] = {
        k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "entropy", "approx_kl", "ptx_loss")
    }
    params = [p for group in optimizer.param_groups for p in group["params"]]
    processes = world()
    # Below the split nothing trains, so its output is computed once; at split 0 that output is the embeddings,
    # which do train (all layers are), so every pass starts from the tokens then.
    frozen = models.split > 0
    # Each batch's lower hidden states are computed once, up front, and held for the iteration: as many as there
    # are batches, one a step at most (a ptx example's beside the 32 rollouts' `scored.below`).
    distil = config.ptx_loss == "reference_kl"
    shares = [_ptx_share(models, batch, frozen, distil) for batch in ptx] if config.ptx_coef > 0 else []
    lengths = packed.lengths.tolist()  # on the host once: each mini-batch's shares are weighed by them
    generator = torch.Generator().manual_seed(config.seed)
    # Mini-batches in a random order, not grouped by length (which pads less): a mini-batch of short answers
    # alone, all with one sign of advantage, steps the policy towards whatever they share rather than towards what
    # tells them from the long ones (on the tiny model, PPO then failed to find the reward's short answers).
    steps = 0
    for _ in range(config.epochs):
        order = torch.randperm(packed.mask.shape[0], generator=generator).tolist()
        for start in range(0, len(order), config.minibatch):
            rows = order[start : start + config.minibatch]
            ptx_share = shares[steps % len(shares)] if shares else None
            steps += 1
            mine = [r for r in rows if processes.owns(r)]
            loss: Tensor | None = None
            if mine:
                loss = _policy_and_value_loss(models, packed, scored, config, mine, frozen, figures)
                if not processes.alone:
                    loss = loss * (sum(lengths[r] for r in mine) / max(1.0, sum(lengths[r] for r in rows)))
            if ptx_share is not None and ptx_share.batch is not None:
                term = _ptx_term(models.policy, ptx_share, models.split)
                figures["ptx_loss"].append(term.detach())
                weighted = config.ptx_coef * term * ptx_share.weight  # the weight of one process's share is 1
                loss = weighted if loss is None else loss + weighted
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()  # type: ignore[no-untyped-call]
            sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
    return {k: float(torch.stack([t.float() for t in v]).mean()) for k, v in figures.items() if v}


def _policy_and_value_loss(
    models: Models,
    packed: Packed,
    scored: Scored,
    config: PPOConfig,
    rows: list[int],
    frozen: bool,
    figures: dict[str, list[Tensor]],
) -> Tensor:
    """The clipped policy loss plus (GAE's) the weighted value loss of the given rows (means over their tokens)."""
    sub = packed.rows(rows)
    a = sub.mask.shape[1]  # the sub-batch's answer width: per-token tensors are cut to it
    below = scored.below[rows, : sub.width] if frozen else None
    new_logprobs, entropy = logprobs_and_entropy(models.policy, sub, models.split, below)
    writer = scored.old_logprobs[rows, :a]
    centre, weights = writer, None
    if config.clip_centre == "iteration":
        centre = scored.proximal_logprobs[rows, :a]
        weights = rl_math.proximal_weights(centre, writer, sub.mask)
    policy_out = rl_math.clipped_policy_loss(
        new_logprobs, centre, scored.advantages[rows, :a], sub.mask, config.clip, weights
    )
    figures["policy_loss"].append(policy_out.loss.detach())
    figures["clip_fraction"].append(policy_out.clip_fraction.detach())
    figures["approx_kl"].append(policy_out.approx_kl.detach())
    figures["entropy"].append(entropy.mean())
    loss: Tensor = policy_out.loss
    if config.advantage == "gae":  # RLOO's baseline is the siblings' return: no value model to fit
        value_loss, _ = rl_math.clipped_value_loss(
            models.value(scored.features[rows, :a]) * sub.mask,
            scored.values[rows, :a],
            scored.returns[rows, :a],
            sub.mask,
            config.value_clip,
        )
        figures["value_loss"].append(value_loss.detach())
        loss = loss + config.value_coef * value_loss
    return loss


@dataclass(frozen=True)
class PtxShare:
    """This process's examples of the ptx batch (None: it has none), their lower hidden states, their share of the
    batch's labelled tokens (the weight of their mean loss), and with the `reference_kl` loss the reference's (N, V)
    next-token log-probabilities at the labelled positions, computed once for the iteration's steps."""

    batch: PtxBatch | None
    below: Tensor | None
    weight: float
    reference: Tensor | None = None


def _ptx_share(models: Models, batch: PtxBatch, frozen: bool, distil: bool = False) -> PtxShare:
    processes = world()
    if not processes.alone:
        labelled = (batch[2][:, 1:] != IGNORE).sum(dim=1).tolist()
        mine = processes.share(list(range(len(labelled))))
        weight = sum(labelled[i] for i in mine) / max(1, sum(labelled))
        if not weight:  # no example, or none with a labelled token: its mean loss would be 0/0
            return PtxShare(None, None, 0.0)
        batch = (batch[0][mine], batch[1][mine], batch[2][mine])
    else:
        weight = 1.0
    below = ptx_lower(models.policy, models.split, batch) if frozen else None
    reference = None
    if distil:
        with torch.no_grad(), adapters_as_wrapped(models.reference) as inner:
            shared = None if below is None else models.below_for("reference", below)
            logits = ptx_logits(inner, batch, models.split, shared)[0]
            reference = torch.log_softmax(logits, dim=-1)
    return PtxShare(batch, below, weight, reference)


def _ptx_term(policy: Any, share: PtxShare, split: int) -> Tensor:
    """The ptx term of one share: KL to the reference where its log-probabilities are known, else the LM loss."""
    assert share.batch is not None
    if share.reference is None:
        return ptx_loss(policy, share.batch, split, share.below)
    return rl_math.reference_kl(ptx_logits(policy, share.batch, split, share.below)[0], share.reference)


def ptx_lower(policy: Any, split: int, batch: PtxBatch) -> Tensor:
    input_ids, attention_mask, _ = batch
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    with torch.no_grad(), adapters_as_wrapped(policy) as inner:
        return lower_cache.lower(layers.backbone_of(inner), split, input_ids, attention_mask, positions)


def ptx_logits(model: Any, batch: PtxBatch, split: int = 0, below: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """((N, V) fp32 next-token logits at the N labelled tokens of a right-padded pre-training batch, (N,) those
    tokens); batch: (input_ids, attention_mask, labels with IGNORE). The LM head runs on the labelled positions only;
    `below` as in `answer_logits`."""
    input_ids, attention_mask, labels = batch
    targets = labels[:, 1:]
    labelled = targets != IGNORE
    if _postprocessed_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return logits[labelled].float(), targets[labelled]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    backbone, head = causal_parts(model)
    hidden = layers.final_hidden(backbone, split, input_ids, attention_mask, positions, below)[:, :-1]
    return head(hidden[labelled]).float(), targets[labelled]


def ptx_loss(policy: Any, batch: PtxBatch, split: int = 0, below: Tensor | None = None) -> Tensor:
    """LM loss (mean over labelled tokens) on a right-padded pre-training batch (`ptx_logits`)."""
    logits, targets = ptx_logits(policy, batch, split, below)
    return torch.nn.functional.cross_entropy(logits, targets)


def sample(
    policy: Any,
    queries: Sequence[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> Rollouts:
    """Rollouts with HF `generate` (left-padded batch): responses cut at EOS (kept), truncated when none came."""
    width = max(len(q) for q in queries)
    ids = torch.full((len(queries), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(queries), width), dtype=torch.long)
    for row, query in enumerate(queries):
        ids[row, width - len(query) :] = torch.tensor(query)
        mask[row, width - len(query) :] = 1
    torch.manual_seed(seed)  # the CPU's generator and every GPU's
    device = device_of(policy)
    # On a CPU, generation in fp32 even inside a bf16 round: its products are one token wide, where bf16 does not
    # pay (16 answers of 256 tokens from SmolLM2 on one AMX core: 80 s fp32, 110 s bf16). A GPU keeps the round's.
    with torch.no_grad(), torch.autocast("cpu", enabled=False) if device.type == "cpu" else nullcontext():
        out = policy.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
    responses, truncated = [], []
    for row in out[:, width:].tolist():
        if eos_id in row:
            responses.append(row[: row.index(eos_id) + 1])
            truncated.append(False)
        else:
            responses.append(row)
            truncated.append(True)
    return Rollouts([list(q) for q in queries], responses, truncated)
