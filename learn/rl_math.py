"""The RLHF math: the K-wise ranking loss of the reward model and the pieces of PPO. Pure functions on tensors.

Shapes: B answers (rows), T tokens per answer (padded, with a 0/1 `mask` of real answer tokens), N scored answers
in a packed ranking batch. No function here touches a model, a file or a global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# -- reward model ---------------------------------------------------------------------------------------------


def pack_rankings(rankings: list[tuple[int, list[list[int]]]]) -> tuple[Tensor, Tensor]:
    """Pack prompts' rankings for one batch: [(K, tiers best first), ...] -> (groups, ranks), each (sum of K,).

    Answer j of prompt p sits at offset sum(K of earlier prompts) + j; its rank is its tier, -1 when unranked.
    """
    groups: list[int] = []
    ranks: list[int] = []
    for prompt, (k, tiers) in enumerate(rankings):
        tier_of = {index: tier for tier, members in enumerate(tiers) for index in members}
        groups += [prompt] * k
        ranks += [tier_of.get(j, -1) for j in range(k)]
    return torch.tensor(groups, dtype=torch.long), torch.tensor(ranks, dtype=torch.long)


def ranking_pairs(groups: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All ordered (winner, loser) pairs inside each prompt's group, and a weight per pair.

    groups: (N,) prompt id of each scored answer; ranks: (N,) tier of each answer, 0 best, ties equal,
    -1 for an answer that was not ranked. Returns (winners, losers, weights), each (P,): indices into N and
    1 / (pairs of that prompt), so that summing weighted pair losses gives each prompt the same weight.
    """
    same = groups[:, None] == groups[None, :]
    ranked = (ranks >= 0)[:, None] & (ranks >= 0)[None, :]
    better = ranks[:, None] < ranks[None, :]
    winners, losers = torch.nonzero(same & ranked & better, as_tuple=True)
    # New tensors go where the inputs are: the same code scores on a GPU and on the CPU.
    count = int(groups.max()) + 1 if groups.numel() else 0
    per_group = torch.zeros(count, dtype=torch.float64, device=groups.device)
    per_group.index_add_(0, groups[winners], torch.ones(winners.numel(), dtype=torch.float64, device=groups.device))
    weights = 1.0 / per_group[groups[winners]]
    return winners, losers, weights


def kwise_ranking_loss(scores: Tensor, groups: Tensor, ranks: Tensor, margin: float = 0.0) -> Tensor:
    """InstructGPT's loss, -1/C(K,2) * sum over pairs of log sigmoid(r_w - r_l - margin), averaged over prompts.

    scores: (N,) one scalar per answer, each answer scored once; groups, ranks: as in `ranking_pairs`. Prompts
    may have different K and ties (a tie forms no pair); a prompt with no pair is left out of the mean.
    """
    winners, losers, weights = ranking_pairs(groups, ranks)
    if winners.numel() == 0:
        return scores.sum() * 0.0  # keeps the graph: nothing to learn from this batch
    losses = -F.logsigmoid(scores[winners] - scores[losers] - margin)
    prompts = weights.sum()  # each prompt's weights sum to 1
    return (losses * weights.to(losses.dtype)).sum() / prompts


def pairwise_accuracy(scores: Tensor, groups: Tensor, ranks: Tensor) -> Tensor:
    """Share of ranked pairs the scores order correctly (a tie in scores counts as wrong)."""
    winners, losers, _ = ranking_pairs(groups, ranks)
    if winners.numel() == 0:
        return torch.tensor(float("nan"), device=scores.device)
    return (scores[winners] > scores[losers]).float().mean()


# -- masked statistics ----------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` where `mask` is 1; unbiased (n - 1) by default, as PPO implementations whiten."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1)
    return var


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Scale `values` to unit variance over the mask (and zero mean unless `shift_mean` is False)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# -- rewards --------------------------------------------------------------------------------------------------


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of each row's last real token; answers are left-aligned (mask 1…1 0…0)."""
    return (mask.sum(dim=1) - 1).clamp(min=0).long()


def kl_penalty_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, scores: Tensor, beta: float | Tensor,
    truncated: Tensor | None = None, truncation_penalty: float = 0.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-token rewards: -beta * KL estimate at every answer token, the score added at the last real token.

    logprobs, ref_logprobs, mask: (B, T) of the sampled tokens under the policy and the SFT reference; scores: (B,)
    reward-model scores; truncated: (B,) bool, answers the length limit cut off, which get `truncation_penalty`
    (usually negative) added to their score. KL is the k1 estimator, log pi(y|x) - log pi_ref(y|x).
    Returns (rewards, kl), both (B, T) and zero outside the mask.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    final = scores.to(rewards.dtype)
    if truncated is not None:
        final = final + truncation_penalty * truncated.to(rewards.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += final
    return rewards * mask, kl


# -- advantages -----------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each answer's tokens; returns (advantages, returns), (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t with V after the last real token taken as 0;
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


# -- losses ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLoss:
    loss: Tensor
    clip_fraction: Tensor  # share of tokens where the clipped term was the one used
    approx_kl: Tensor  # mean of 0.5 * (log ratio)^2 against the policy that sampled


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip: float) -> PolicyLoss:  # fmt: skip
    """PPO's clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """0.5 * mean of max((V - R)^2, (clip(V, V_old ± clip) - R)^2); returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy of the next-token distributions at the masked positions; logits (B, T, V)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return masked_mean(entropy, mask)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) under `logits`: logits (B, T, V) predicting `tokens` (B, T); computed in fp32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


# -- KL controllers -------------------------------------------------------------------------------------------


class FixedKLController:
    def __init__(self, beta: float) -> None:
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state(self) -> dict[str, float]:
        return {"value": self.value}


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": float(self.horizon)}
