"""How good a policy is on held-out prompts: the reward model's mean score of its answers, its KL to the SFT
reference, its LM loss on held-out text, and a few sample answers to read.

The same prompts and sampling seeds serve every policy evaluated, so two versions' figures differ by the policy
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from learn.data import Example
from learn.ppo import Rollouts, pack, sample, token_logprobs
from learn.ppo_run import Models
from learn.prompts import Prompt
from learn.sft import evaluate_lm, pad_id


@dataclass(frozen=True)
class PolicyEval:
    reward: float  # mean normalised reward-model score of the sampled answers
    kl: float  # mean per-answer KL to the reference (sum over the answer's tokens of log pi - log pi_ref)
    ptx_loss: float | None  # LM loss per token on held-out text; None without held-out text
    answer_length: float  # tokens
    answers: int
    samples: list[dict[str, str]]

    def figures(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate_policy(
    models: Models, prompts: Sequence[Prompt], ptx_held: Sequence[Example], max_new_tokens: int,
    per_prompt: int = 2, seed: int = 1234, batch: int = 8, n_samples: int = 3,
) -> PolicyEval:  # fmt: skip
    """Sample `per_prompt` answers to each prompt (fixed seeds) and measure them; the policy is not changed."""
    tokenizer, pad = models.tokenizer, pad_id(models.tokenizer)
    queries = [p.ids for p in prompts for _ in range(per_prompt)]
    rewards: list[float] = []
    kls: list[float] = []
    lengths: list[int] = []
    responses: list[list[int]] = []
    for start in range(0, len(queries), batch):
        chunk = sample(models.policy, queries[start : start + batch], max_new_tokens, int(tokenizer.eos_token_id),
                       pad, seed=seed + start)  # fmt: skip
        rewards += models.reward([q + r for q, r in zip(chunk.queries, chunk.responses, strict=True)]).tolist()
        kls += answer_kl(models, chunk, pad).tolist()
        lengths += [len(r) for r in chunk.responses]
        responses += chunk.responses
    samples = [
        {"prompt": prompts[i].messages[-1]["content"],
         "answer": str(tokenizer.decode(responses[i * per_prompt], skip_special_tokens=True))}
        for i in range(min(n_samples, len(prompts)))
    ]  # fmt: skip
    ptx = evaluate_lm(models.policy, tokenizer, ptx_held) if ptx_held else None
    n = max(1, len(rewards))
    return PolicyEval(sum(rewards) / n, sum(kls) / n, ptx, sum(lengths) / n, len(rewards), samples)


def answer_kl(models: Models, rollouts: Rollouts, pad: int) -> torch.Tensor:
    """(B,) KL of each answer to the reference: the sum of the per-token log-ratio over the answer."""
    packed = pack(rollouts, pad)
    ratio = token_logprobs(models.policy, packed) - token_logprobs(models.reference, packed)
    return (ratio * packed.response_mask).sum(dim=1)
