"""A PPO round: the four models, the iterations and their data cursor, and checkpoints that resume exactly.

Models: the policy being trained (LoRA adapters by default, or all weights), the frozen SFT reference (with LoRA on
the reference itself, the same weights with the adapters switched off), a value model initialised from the reward
model (its backbone and its scalar head, the normalisation offset as the head's bias), and the frozen reward model.

Each iteration's prompts, sampling seed and ptx batch are a function of (seed, iteration), so the data cursor is
the iteration number and a resumed round meets the same data as an uninterrupted one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learn import rl_math
from learn.data import Example
from learn.loop import save_atomic, trainable_state
from learn.ppo import AdapterOff, PPOConfig, ValueHead, ppo_step, sample
from learn.prompts import Prompt
from learn.reward_model import RewardScorer, _parts, load_reward_model
from learn.sft import LoraOptions, collate, load_causal_lm, pad_id

# No dropout in PPO: the log-probabilities of the rollouts must be those the update then compares against.
PPO_LORA = LoraOptions(dropout=0.0)


@dataclass(frozen=True)
class RoundConfig:
    iterations: int = 16
    prompts_per_iteration: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    lr: float = 1e-4  # the policy's (LoRA) learning rate; 1e-5 suits full fine-tuning
    value_lr: float = 1e-4
    init_kl_coef: float = 0.05  # beta at the start
    kl_target: float | None = 6.0  # per-answer KL the adaptive controller steers to; None: beta stays fixed
    kl_horizon: int = 10_000
    ptx_batch: int = 4  # pre-training examples per mini-batch (when ptx_coef > 0 and there is ptx data)
    lora: bool = True
    seed: int = 0
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(ptx_coef=0.5))


@dataclass
class Models:
    policy: Any
    reference: Any
    value: ValueHead
    reward: RewardScorer
    tokenizer: Any


def value_model(reward_folder: Path, lora: LoraOptions | None) -> ValueHead:
    """The reward model's backbone and head as a per-position value model; starts out predicting the reward."""
    model, _ = load_reward_model(reward_folder)
    backbone, head = _parts(model)
    value = ValueHead(backbone, head.in_features)
    offset = RewardScorer.read_offset(reward_folder)
    with torch.no_grad():
        value.head.weight.copy_(head.weight.float())
        value.head.bias.fill_(-offset)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        value.backbone = get_peft_model(backbone, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                             target_modules="all-linear"))  # fmt: skip
    return value


def load_models(policy_folder: Path, reference_folder: Path, reward_folder: Path, lora: bool) -> Models:
    options = PPO_LORA if lora else None
    policy, tokenizer = load_causal_lm(policy_folder, options)
    if lora and policy_folder.resolve() == reference_folder.resolve():
        reference: Any = AdapterOff(policy)
    else:
        reference, _ = load_causal_lm(reference_folder)
        reference.requires_grad_(False)
    policy.eval()  # no dropout anywhere; gradients still flow
    return Models(policy, reference, value_model(reward_folder, options).eval(), RewardScorer(reward_folder),
                  tokenizer)  # fmt: skip


def trainable(module: Any) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class PPORound:
    """Iterations of rollouts and PPO updates on a fixed set of training prompts."""

    def __init__(self, models: Models, config: RoundConfig, prompts: Sequence[Prompt],
                 ptx: Sequence[Example] = ()) -> None:  # fmt: skip
        if not prompts:
            raise ValueError("no training prompts")
        self.models, self.config, self.prompts, self.ptx = models, config, list(prompts), list(ptx)
        self.optimizer = torch.optim.AdamW([
            {"params": trainable(models.policy), "lr": config.lr},
            {"params": trainable(models.value), "lr": config.value_lr},
        ], weight_decay=0.0)  # fmt: skip
        self.controller: rl_math.AdaptiveKLController | rl_math.FixedKLController = (
            rl_math.AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
            if config.kl_target is not None
            else rl_math.FixedKLController(config.init_kl_coef)
        )
        self.iteration = 0
        self.pad_id = pad_id(models.tokenizer)

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.iteration * 7 + salt)

    def batch(self) -> list[Prompt]:
        """This iteration's prompts: a seeded draw without replacement (with it, when there are fewer prompts)."""
        n, generator = self.config.prompts_per_iteration, self._generator(1)
        if len(self.prompts) >= n:
            rows = torch.randperm(len(self.prompts), generator=generator)[:n].tolist()
        else:
            rows = torch.randint(len(self.prompts), (n,), generator=generator).tolist()
        return [self.prompts[i] for i in rows]

    def ptx_batch(self) -> tuple[Tensor, Tensor, Tensor] | None:
        if not self.ptx or self.config.ppo.ptx_coef <= 0:
            return None
        rows = torch.randint(len(self.ptx), (self.config.ptx_batch,), generator=self._generator(2)).tolist()
        batch = collate([self.ptx[i] for i in rows], self.pad_id)
        return batch["input_ids"], batch["attention_mask"], batch["labels"]

    def step(self) -> dict[str, float]:
        """One iteration: sample, score, update. Returns its figures, timings included."""
        m, config = self.models, self.config
        started = time.perf_counter()
        rollouts = sample(m.policy, [p.ids for p in self.batch()], config.max_new_tokens,
                          int(m.tokenizer.eos_token_id), self.pad_id, config.temperature,
                          seed=config.seed * 1_000_003 + self.iteration)  # fmt: skip
        generated = time.perf_counter()
        figures = ppo_step(m.policy, m.reference, m.value, m.reward, rollouts, config.ppo, self.controller,
                           self.optimizer, self.pad_id, self.ptx_batch())  # fmt: skip
        self.iteration += 1
        total = time.perf_counter() - started
        tokens = sum(len(r) for r in rollouts.responses)
        figures.update(generate_s=generated - started, iteration_s=total, rollout_tokens=float(tokens),
                       generate_tokens_per_s=tokens / max(1e-9, generated - started),
                       truncated=sum(rollouts.truncated) / len(rollouts.truncated))  # fmt: skip
        figures["other_s"] = max(0.0, total - figures["generate_s"] - figures["score_s"] - figures["update_s"])
        return figures

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Everything the next iteration depends on, written whole or not at all."""
        state = {
            "meta": meta, "iteration": self.iteration, "policy": trainable_state(self.models.policy),
            "value": trainable_state(self.models.value), "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state(), "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }  # fmt: skip
        save_atomic(path, state)

    def resume(self, path: Path, meta: dict[str, Any]) -> bool:
        """Continue from `path` when it belongs to this round (same meta); False when there is nothing to resume."""
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        if state["meta"] != meta:
            raise CheckpointMismatch(path, state["meta"], meta)
        self.models.policy.load_state_dict(state["policy"], strict=False)
        self.models.value.load_state_dict(state["value"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.value = float(state["controller"]["value"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.iteration = int(state["iteration"])
        return True


class CheckpointMismatch(RuntimeError):
    def __init__(self, path: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
        differs = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        super().__init__(f"{path} belongs to another round (differs in {', '.join(differs)}); "
                         "delete it or pass --fresh to start over")  # fmt: skip


def checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """What round the checkpoint at `path` belongs to (parent, reward model, configuration); None without one."""
    if not path.is_file():
        return None
    # Memory-mapped: the meta without reading the weights and optimiser state (GBs when training all weights).
    meta: dict[str, Any] = torch.load(path, weights_only=False, mmap=True)["meta"]
    return meta
