"""The RLHF math: the K-wise ranking loss of the reward model and the pieces of PPO. Pure functions on tensors.

Shapes: N scored answers in a packed ranking batch; B answers (rows) of A tokens in the per-token functions.

Every per-token tensor here is in the **answer frame**: `(B, A)`, column j of row b is answer b's j-th token, and
`mask` is 1…1 0…0 (the answer from column 0, padding after it). The code that packs prompt + answer sequences for
the model cuts the answers out of them once, at the boundary (learn.ppo.pack and Packed.answers); the functions
here check the frame (`check_answer_frame`) instead of trusting it, because a mask in the sequence frame
(0…0 1…1 0…0, the prompt first) puts the final reward on a prompt position, where the mask then erases it.
No function here touches a model, a file or a global.
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


READOUTS = ("last", "mean", "lme")
ANSWER_READOUTS = ("lme",)  # the readouts that pool the answer's tokens, so need to know where the answer is


def last_real(mask: Tensor) -> Tensor:
    """(N,) position of each row's last real token (`mask` 1), whichever side the padding is on."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask * positions).argmax(dim=1)


def sequence_scores(per_token: Tensor, mask: Tensor, readout: str, answer: Tensor | None = None) -> Tensor:
    """(N,) one score per sequence from the reward model's per-token scores (N, L) (its linear head applied to
    every position's final hidden state), in the **sequence frame**: `mask` marks each row's real tokens, prompt and
    answer, padding on either side; `answer` (same frame) marks the answer's tokens, where a readout needs them.

    `last`: the score at the last real token (InstructGPT's readout). `mean`: the mean over every real token. The
    mean predicts held-out rankings better from the same rankings, because every token's state carries gradient
    instead of one. But a prompt's tokens are the same in its K answers, so the share they take of the mean falls
    as the answer grows: the mean carries the answer's length, which PPO can then buy reward with (BENCHMARKS.md,
    the reward-model curves and the keyword:however run).

    `lme`: log-mean-exp over the answer's tokens, log(mean_t exp(s_t)): a soft maximum. One token can carry the
    answer (a word users want, anywhere in it), every token's state gets gradient in proportion to its share, and
    the prompt's tokens are not pooled (they shape the answer's states, as in any readout), so no prompt share of the
    pool can carry the length. A row with no answer token (an empty answer cut to nothing) reads its last real token;
    without `answer`, every real token is pooled.
    """
    if readout == "last":
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), last_real(mask)]
    real = mask.bool()
    if readout == "mean":
        # where, not a product: a padding position's state may be anything, NaN included (a fully masked row)
        total = torch.where(real, per_token, torch.zeros_like(per_token)).sum(dim=1)
        return total / real.sum(dim=1).clamp(min=1).to(per_token.dtype)
    if readout == "lme":
        pooled = real if answer is None else real & answer.bool()
        # A row with nothing to pool pools its last real token alone: a row of -inf only would give NaN gradients.
        last = F.one_hot(last_real(mask), per_token.shape[1]).bool()
        pooled = torch.where(pooled.any(dim=1, keepdim=True), pooled, last)
        masked = torch.where(pooled, per_token, torch.full_like(per_token, float("-inf")))
        return torch.logsumexp(masked, dim=1) - torch.log(pooled.sum(dim=1).to(per_token.dtype))
    raise ValueError(f"unknown reward-model readout {readout!r}: one of {', '.join(READOUTS)}")


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
        var = var * count / (count - 1).clamp(min=1)  # one token: its variance is 0, not 0/0
    return var


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, min_std: float = 0.0) -> Tensor:
    """Scale `values` to unit variance over the mask (and zero mean unless `shift_mean` is False); `min_std`: never
    divide by a standard deviation below it (values that barely vary then stay small)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var.clamp(min=min_std**2) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# -- the answer frame -----------------------------------------------------------------------------------------


def check_answer_frame(mask: Tensor) -> None:
    """Raise ValueError unless `mask` (B, A) is in the answer frame: every row 1…1 0…0 with at least one 1."""
    if mask.dim() != 2:
        raise ValueError(f"expected a (B, A) answer mask, got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        return
    if bool((mask[:, 1:] > mask[:, :-1]).any()) or bool((mask[:, 0] == 0).any()):
        bad = int(((mask[:, 1:] > mask[:, :-1]).any(dim=1) | (mask[:, 0] == 0)).nonzero()[0])
        raise ValueError(
            f"row {bad} of the mask is not in the answer frame (1…1 0…0 from column 0): "
            f"{mask[bad].tolist()}; cut the answers out of the packed sequences first"
        )


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) column of each answer's last token; `mask` in the answer frame (checked)."""
    check_answer_frame(mask)
    return (mask.sum(dim=1) - 1).long()


# -- rewards --------------------------------------------------------------------------------------------------


def kl_penalty_rewards(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    scores: Tensor,
    beta: float | Tensor,
    truncated: Tensor | None = None,
    truncation_penalty: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: -beta * KL estimate at every answer token, the score added at the answer's last token.

    logprobs, ref_logprobs, mask: (B, A), answer frame, of the sampled tokens under the policy and the SFT reference
    (InstructGPT, Ziegler et al. 2019: the reward model's score is a reward for the whole answer, given when the
    answer ends; the KL penalty is paid token by token); scores: (B,)
    reward-model scores; truncated: (B,) bool, answers the length limit cut off, which get `truncation_penalty`
    (usually negative) added to their score. KL is the k1 estimator, log pi(y|x) - log pi_ref(y|x).
    Returns (rewards, kl), both (B, A) and zero outside the mask.
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
    """Generalised advantage estimation (Schulman et al. 2016) over each answer's tokens; returns (advantages,
    returns), both (B, A) in the answer frame, like `rewards`, `values` and `mask`.

    values[:, j] is V of the state before answer token j (the prompt and tokens 0..j-1). delta_j = r_j +
    gamma * V_{j+1} - V_j, with V after the answer's last token taken as 0 (the episode ends there, also for an
    answer cut by the length limit, which `kl_penalty_rewards` penalises instead); A_j = delta_j + gamma * lam *
    A_{j+1}; returns = A + V.
    """
    check_answer_frame(mask)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def leave_one_out(returns: Tensor, groups: Tensor) -> Tensor:
    """(B,) each answer's return less the mean return of the other answers to the same prompt (RLOO, Ahmadian et al.
    2024): the baseline of K answers to one prompt is their siblings', so what a prompt adds to every answer's score
    (a reward model trained on pairs inside a prompt never calibrates scores across prompts) cancels out.

    returns: (B,) one figure per answer; groups: (B,) the prompt of each answer. An answer without siblings is set
    against the mean of every other answer in the batch (in a batch of one its advantage is 0)."""
    count = int(groups.max()) + 1 if groups.numel() else 0
    sums = torch.zeros(count, dtype=returns.dtype, device=returns.device).index_add_(0, groups, returns)
    siblings = torch.bincount(groups, minlength=count)[groups].to(returns.dtype) - 1
    within = (sums[groups] - returns) / siblings.clamp(min=1)
    # A batch of one has nothing to compare with: its own return is its baseline.
    others = (returns.sum() - returns) / (returns.numel() - 1) if returns.numel() > 1 else returns
    return returns - torch.where(siblings > 0, within, others)


# -- losses ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLoss:
    loss: Tensor
    clip_fraction: Tensor  # share of tokens where the clipped term was the one used
    approx_kl: Tensor  # mean of 0.5 * (log ratio)^2 against the clip's centre


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float,
    weights: Tensor | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017): mean over answer tokens of w * max(-A * ratio, -A *
    clip(ratio, 1 - clip, 1 + clip)), ratio = pi(y_t) / pi_old(y_t) from log-probabilities; all (B, A), answer frame.

    `old_logprobs` are where the clip is centred: the policy's that sampled the tokens (for answers users ranked:
    the served version's), so that the clip bounds how far the update moves from the policy that wrote them; or, in
    decoupled PPO, the policy's at the start of the iteration, with `weights` (w, no gradient; 1 when None) the
    importance weights from the writer to it (`proximal_weights`)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    chosen = torch.maximum(unclipped, clipped)
    loss = masked_mean(chosen if weights is None else weights.detach() * chosen, mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


# Importance weights above this are cut (Espeholt et al. 2018 truncate theirs at 1; twice lets a token the policy
# has come to prefer count for more, as decoupled PPO's untruncated weights would, but bounds one sample's say).
WEIGHT_CAP = 2.0


def proximal_weights(proximal: Tensor, behaviour: Tensor, mask: Tensor, cap: float = WEIGHT_CAP) -> Tensor:
    """(B, A) decoupled PPO's importance weights (Hilton et al. 2021), min(pi_prox(y_t) / pi_behav(y_t), cap):
    answers the behaviour policy wrote count as samples of the proximal one (the policy at the start of the
    iteration), about which the clip is then centred; 0 outside the mask. Answer frame, log-probabilities in."""
    return torch.exp((proximal - behaviour) * mask).clamp(max=cap) * mask


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """0.5 * mean of max((V - R)^2, (clip(V, V_old ± clip) - R)^2) over the mask; returns (loss, clip fraction).
    All (B, A), answer frame."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


def reference_kl(logits: Tensor, reference_logprobs: Tensor) -> Tensor:
    """Mean over N positions of KL(ref || pi) between next-token distributions: the policy's logits (N, V), the
    reference's log-probabilities (N, V); fp32.

    On texts the reference sampled, this is the LM loss's expectation over each next token, less the reference's
    entropy (a constant): the same pull towards the reference, without the noise of the one token sampled, so that
    its gradient is exactly 0 wherever the policy is the reference. Fitting the sampled tokens themselves over
    several epochs instead moves a policy that no reward moves (BENCHMARKS.md, the control hours)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    reference = reference_logprobs.float()
    return (reference.exp() * (reference - logp)).sum(dim=-1).mean()


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) under `logits`: logits (..., V) predicting `tokens` (...); computed in fp32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs_and_entropy(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(`token_logprobs`, the entropy of each next-token distribution, without gradient): both from one
    log-softmax over the vocabulary, the costly part of each on a CPU (a pass over N x V floats)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        seen = logp.detach()
        entropy = -(seen.exp() * seen).sum(dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1), entropy


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
