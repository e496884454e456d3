"""One PPO iteration on a batch of rollouts: score, penalise KL to the reference, GAE, clipped updates, ptx.

Objective (InstructGPT): E[r(x,y) - beta * log(pi(y|x) / pi_ref(y|x))] + gamma * E_pretrain[log pi(x)].
The step only calls the models and learn.rl_math; generation and the reward model are passed in, so the same step
serves any rollout path.

Shapes: B rollouts; each is query ids + response ids, packed right-padded into (B, L). Position t of the response
is predicted by the logits at position t - 1, so per-token tensors are (B, L - 1), masked to response tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learn import rl_math
from learn.data import right_pad
from learn.sft import lm_loss

RewardFn = Callable[[list[list[int]]], Tensor]  # full sequences (query + response) -> (B,) scores


@dataclass(frozen=True)
class PPOConfig:
    gamma: float = 1.0  # discount (per token)
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2
    value_coef: float = 0.1
    ptx_coef: float = 0.0  # gamma of the InstructGPT objective: weight of the pre-training LM loss
    epochs: int = 4  # passes over the batch
    minibatch: int = 4  # rollouts per optimiser step
    truncation_penalty: float = 0.0  # added to the score of answers the length limit cut off
    max_grad_norm: float = 1.0
    seed: int = 0  # order of the mini-batches


@dataclass(frozen=True)
class Rollouts:
    queries: list[list[int]]
    responses: list[list[int]]
    truncated: list[bool]


@dataclass(frozen=True)
class Packed:
    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    response_mask: Tensor  # (B, L - 1): 1 where the next token (t + 1) is a response token


def pack(rollouts: Rollouts, pad_id: int) -> Packed:
    ids, mask = right_pad([q + r for q, r in zip(rollouts.queries, rollouts.responses, strict=True)], pad_id)
    response = torch.zeros((ids.shape[0], ids.shape[1] - 1))
    for row, (query, answer) in enumerate(zip(rollouts.queries, rollouts.responses, strict=True)):
        response[row, len(query) - 1 : len(query) + len(answer) - 1] = 1.0
    return Packed(ids, mask, response)


class AdapterOff:
    """A LoRA policy with its adapters switched off: the reference, without a second copy of the weights."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, **inputs: Tensor) -> Any:
        with self.model.disable_adapter():
            return self.model(**inputs)


def causal_parts(model: Any) -> tuple[Any, Any]:
    """(backbone, LM head) of a causal LM, under a LoRA wrapper or not (the adapters stay in force)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def answer_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, select: Tensor) -> Tensor:
    """(N, V) fp32 next-token logits at the N positions where `select` (B, L - 1) is true.

    The LM head runs on the answer positions only: the prompt's logits are never used, and the vocabulary-sized
    work (head, log-softmax, entropy) on them would be most of it, prompts being longer than answers.
    """
    if isinstance(model, AdapterOff):
        with model.model.disable_adapter():
            return answer_logits(model.model, input_ids, attention_mask, select)
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        full: Tensor = model(input_ids=input_ids, attention_mask=attention_mask).logits  # post-processed logits
        return full[:, :-1][select].float()
    backbone, head = causal_parts(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    logits: Tensor = head(hidden[select]).float()
    return logits


def logprobs_and_logits(model: Any, input_ids: Tensor, attention_mask: Tensor,
                        response_mask: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """((B, L - 1) log-probabilities of each answer token, zero elsewhere; (N, V) the answer positions' logits)."""
    select = response_mask.bool()
    logits = answer_logits(model, input_ids, attention_mask, select)
    picked = rl_math.token_logprobs(logits.unsqueeze(0), input_ids[:, 1:][select].unsqueeze(0)).squeeze(0)
    return torch.zeros(select.shape).masked_scatter(select, picked), logits


def token_logprobs(model: Any, packed: Packed) -> Tensor:
    """(B, L - 1) log-probabilities of each answer token under `model` (fp32), zero outside the answers."""
    return logprobs_and_logits(model, packed.input_ids, packed.attention_mask, packed.response_mask)[0]


def values(value_model: Any, packed: Packed) -> Tensor:
    """(B, L - 1) value estimates at the positions that predict each next token."""
    out: Tensor = value_model(packed.input_ids, packed.attention_mask)
    return out[:, :-1]


def ppo_step(
    policy: Any, reference: Any, value_model: Any, reward_fn: RewardFn, rollouts: Rollouts, config: PPOConfig,
    kl_controller: rl_math.AdaptiveKLController | rl_math.FixedKLController, optimizer: torch.optim.Optimizer,
    pad_id: int, ptx_batch: tuple[Tensor, Tensor, Tensor] | None = None,
) -> dict[str, float]:  # fmt: skip
    """One iteration: returns its metrics (reward, KL, beta, entropy, clip fraction, losses, answer length) and
    where its time went (`score_s`: log-probs, values and rewards; `update_s`: the epochs of mini-batches)."""
    started = time.perf_counter()
    packed = pack(rollouts, pad_id)
    mask = packed.response_mask
    with torch.no_grad():
        old_logprobs = token_logprobs(policy, packed)
        ref_logprobs = token_logprobs(reference, packed)
        old_values = values(value_model, packed) * mask
        scores = reward_fn([q + r for q, r in zip(rollouts.queries, rollouts.responses, strict=True)]).float()
        truncated = torch.tensor(rollouts.truncated)
        rewards, kl = rl_math.kl_penalty_rewards(old_logprobs, ref_logprobs, mask, scores, kl_controller.value,
                                                 truncated, config.truncation_penalty)  # fmt: skip
        advantages, returns = rl_math.gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = rl_math.whiten(advantages, mask)
    figures: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "entropy",
                                                       "approx_kl", "ptx_loss")}  # fmt: skip
    scored = time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        order = torch.randperm(len(rollouts.queries), generator=generator).tolist()
        for start in range(0, len(order), config.minibatch):
            rows = order[start : start + config.minibatch]
            sub = Packed(packed.input_ids[rows], packed.attention_mask[rows], mask[rows])
            new_logprobs, logits = logprobs_and_logits(policy, sub.input_ids, sub.attention_mask, sub.response_mask)
            policy_out = rl_math.clipped_policy_loss(new_logprobs, old_logprobs[rows], advantages[rows],
                                                     sub.response_mask, config.clip)  # fmt: skip
            value_loss, _ = rl_math.clipped_value_loss(values(value_model, sub), old_values[rows], returns[rows],
                                                       sub.response_mask, config.value_clip)  # fmt: skip
            loss = policy_out.loss + config.value_coef * value_loss
            if ptx_batch is not None and config.ptx_coef > 0:
                ptx = ptx_loss(policy, ptx_batch)
                loss = loss + config.ptx_coef * ptx
                figures["ptx_loss"].append(float(ptx.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            figures["policy_loss"].append(float(policy_out.loss.detach()))
            figures["value_loss"].append(float(value_loss.detach()))
            figures["clip_fraction"].append(float(policy_out.clip_fraction.detach()))
            figures["approx_kl"].append(float(policy_out.approx_kl.detach()))
            every = torch.ones(1, logits.shape[0])  # the logits are the answer positions' already
            figures["entropy"].append(float(rl_math.entropy_from_logits(logits.detach().unsqueeze(0), every)))
    kl_per_answer = float((kl * mask).sum(dim=1).mean())
    beta = kl_controller.value
    kl_controller.update(kl_per_answer, len(rollouts.queries))
    lengths = mask.sum(dim=1)
    return {
        "reward": float(scores.mean()), "kl_per_token": float(rl_math.masked_mean(kl, mask)),
        "kl_per_answer": kl_per_answer, "beta": beta, "answer_length": float(lengths.mean()),
        "score_s": scored - started, "update_s": time.perf_counter() - scored,
        **{k: sum(v) / len(v) for k, v in figures.items() if v},
    }  # fmt: skip


def ptx_loss(policy: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """LM loss (mean over labelled tokens) on a pre-training batch: (input_ids, attention_mask, labels with -100)."""
    input_ids, attention_mask, labels = batch
    return lm_loss(policy, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


class ValueHead(torch.nn.Module):
    """A value model: a backbone's hidden states through a linear head, one value per position."""

    def __init__(self, backbone: Any, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out: Tensor = self.head(hidden.float()).squeeze(-1)
        return out


def sample(policy: Any, queries: Sequence[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, seed: int = 0) -> Rollouts:  # fmt: skip
    """Rollouts with HF `generate` (left-padded batch): responses cut at EOS (kept), truncated when none came."""
    width = max(len(q) for q in queries)
    ids = torch.full((len(queries), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(queries), width), dtype=torch.long)
    for row, query in enumerate(queries):
        ids[row, width - len(query) :] = torch.tensor(query)
        mask[row, width - len(query) :] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = policy.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
        )  # fmt: skip
    responses, truncated = [], []
    for row in out[:, width:].tolist():
        if eos_id in row:
            responses.append(row[: row.index(eos_id) + 1])
            truncated.append(False)
        else:
            responses.append(row)
            truncated.append(True)
    return Rollouts([list(q) for q in queries], responses, truncated)
