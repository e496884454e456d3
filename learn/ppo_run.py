"""A PPO round: the models, the iterations and their data cursor, and checkpoints that resume exactly.

Models: the policy being trained (LoRA adapters on its upper `train_layers` layers by default, or those layers'
weights), the frozen SFT reference (with LoRA on the reference itself, the same weights with the adapters switched
off), the frozen reward model, and a value model on the reward model's features (its head starts as the reward
model's, the normalisation offset as its bias). Below the trained layers every model that has the reference's
weights there shares one forward pass per batch (learn.layers).

Rollouts: by default the answers users ranked, as the served version wrote them (`Served`): they cost nothing to
generate. PPO weights each of their tokens by the policy's probability over the version that wrote it, as of the
start of each iteration, and centres its clip there (decoupled PPO; `PPOConfig.clip_centre`): centred on the
writer instead, the clip takes away the gradient that pushes a sampled token past 1 ± clip of the served version's
probability for the whole round, however many iterations it runs. Without such answers (a new prompt file, a
version never served) the policy samples its own with HF `generate`.

Each iteration's rows, sampling seed and ptx batches are a function of (seed, iteration), so the data cursor is the
iteration number and a resumed round meets the same data as an uninterrupted one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from deploy.settings import Settings
from learn import layers, rl_math
from learn.data import Example
from learn.device import device_of
from learn.distributed import agreed, world
from learn.loop import save_atomic, trainable_state
from learn.ppo import (
    AdapterOff,
    Models,
    PPOConfig,
    PtxBatch,
    RewardFn,
    Rollouts,
    ValueModel,
    backbone,
    ppo_step,
    sample,
)
from learn.prompts import Prompt, Served
from learn.reward_model import RewardScorer, _parts
from learn.sft import collate
from learn.weights import LoraOptions, load_causal_lm, pad_id

# No dropout in PPO: the log-probabilities of the rollouts must be those the update then compares against.
PPO_LORA = LoraOptions(dropout=0.0)


def _default(setting: str) -> Any:
    """A setting's embedded default: the knobs an operator sets have their defaults in deploy/settings.py alone."""
    return Settings.model_fields[setting].default


def _ppo_default() -> PPOConfig:
    return PPOConfig(
        ptx_coef=_default("learn_ptx_coef"),
        epochs=_default("learn_ppo_epochs"),
        seed=_default("learn_seed"),
        advantage=_default("learn_advantage"),
        clip_centre=_default("learn_clip_centre"),
        advantage_floor=_default("learn_advantage_floor"),
        ptx_loss=_default("learn_ptx_loss"),
    )


@dataclass(frozen=True)
class RoundConfig:
    """A PPO round's configuration. `from_settings` is how the daemon and `rankloop learn ppo` make one; the CLI's
    flags then change it with `changed`. Fields without a setting have their one default here."""

    iterations: int = _default("learn_ppo_iterations")
    prompts_per_iteration: int = _default("learn_prompts_per_iteration")  # served comparisons or sampled prompts
    max_new_tokens: int = _default("learn_max_new_tokens")  # the limit of sampled rollouts and evaluation answers
    temperature: float = 1.0
    lr: float = _default("learn_ppo_lr")  # the policy's (LoRA) learning rate; 1e-5 suits full fine-tuning
    value_lr: float = _default("learn_ppo_lr")
    init_kl_coef: float = 0.05  # beta at the start
    kl_target: float | None = 6.0  # per-answer KL the adaptive controller steers to; None: beta stays fixed
    kl_horizon: int = 10_000
    # The ptx term (when ptx_coef > 0 and there is ptx data): examples per optimiser step, and how many distinct
    # examples an iteration draws (rounded down to whole batches), dealt over its steps in turn (None: every step
    # draws its own). One example a step, four an iteration: with the reference's answers as ptx texts, four a step
    # (the same four at each of an iteration's 16 steps) cost as much as the rollouts' own update, and one of its
    # own a step 10% more an iteration than one of four (BENCHMARKS.md, `ptx_cost`).
    ptx_batch: int = 1
    ptx_pool: int | None = 4
    # Sampled rollouts with RLOO's advantages: answers sampled to each prompt, its siblings (served comparisons
    # bring their K).
    siblings: int = 4
    lora: bool = True
    train_layers: int = _default("learn_train_layers")  # upper layers trained (LoRA adapters or weights); 0: all
    rollouts: Literal["served", "sampled"] = _default("learn_rollouts")
    reward: Literal["model", "zero"] = _default("learn_reward")  # zero: the score replaced by 0 (a control)
    seed: int = _default("learn_seed")  # the adapters' initialisation, the rollouts' draw, the mini-batches' order
    ppo: PPOConfig = field(default_factory=_ppo_default)

    def __post_init__(self) -> None:
        if self.siblings < 2:
            raise ValueError(f"siblings {self.siblings}: RLOO needs 2 answers to a prompt at least")
        if self.ptx_batch < 1 or (self.ptx_pool is not None and self.ptx_pool < self.ptx_batch):
            raise ValueError(f"ptx_batch {self.ptx_batch}, ptx_pool {self.ptx_pool}: want 1 <= ptx_batch <= ptx_pool")
        # One seed for the whole round: the mini-batch order follows the round's seed, whoever set either.
        if self.ppo.seed != self.seed:
            object.__setattr__(self, "ppo", replace(self.ppo, seed=self.seed))

    @classmethod
    def from_settings(cls, settings: Settings) -> RoundConfig:
        return cls(
            iterations=settings.learn_ppo_iterations,
            prompts_per_iteration=settings.learn_prompts_per_iteration,
            max_new_tokens=settings.learn_max_new_tokens,
            lr=settings.learn_ppo_lr,
            value_lr=settings.learn_ppo_lr,
            train_layers=settings.learn_train_layers,
            rollouts=settings.learn_rollouts,
            reward=settings.learn_reward,
            seed=settings.learn_seed,
            ppo=PPOConfig(
                ptx_coef=settings.learn_ptx_coef,
                epochs=settings.learn_ppo_epochs,
                seed=settings.learn_seed,
                advantage=settings.learn_advantage,
                clip_centre=settings.learn_clip_centre,
                advantage_floor=settings.learn_advantage_floor,
                ptx_loss=settings.learn_ptx_loss,
            ),
        )

    def for_ptx(self, from_reference: bool) -> RoundConfig:
        """This configuration with its ptx loss chosen where it was left unset: the KL to the reference on texts
        the reference wrote, the LM loss on others."""
        if self.ppo.ptx_loss is not None:
            return self
        return replace(self, ppo=replace(self.ppo, ptx_loss="reference_kl" if from_reference else "lm"))

    def changed(
        self,
        ptx_coef: float | None = None,
        advantage: Literal["gae", "rloo"] | None = None,
        clip_centre: Literal["served", "iteration"] | None = None,
        ptx_loss: Literal["lm", "reference_kl"] | None = None,
        **fields: Any,
    ) -> RoundConfig:
        """This configuration with the fields given a value (None: keep), `ptx_coef`, `advantage`, `clip_centre` and
        `ptx_loss` going to the PPO part."""
        ppo = replace(
            self.ppo,
            ptx_coef=self.ppo.ptx_coef if ptx_coef is None else ptx_coef,
            advantage=advantage or self.ppo.advantage,
            clip_centre=clip_centre or self.ppo.clip_centre,
            ptx_loss=ptx_loss or self.ppo.ptx_loss,
        )
        return replace(self, ppo=ppo, **{name: value for name, value in fields.items() if value is not None})


def value_model(scorer: RewardScorer, split: int, from_reward: bool = True) -> ValueModel:
    """The reward model's backbone (frozen) and head as a per-position value model: starts out predicting the
    normalised reward of each answer prefix. `from_reward=False` (the zero-reward control): the head starts at 0,
    since a head that predicts the reward model's score makes GAE's V(t+1) - V(t) the reward model's preferences,
    and the control would learn them all the same."""
    backbone, head = _parts(scorer.model)
    value = ValueModel(backbone, head.in_features, split, scorer.shares_lower)
    with torch.no_grad():
        if from_reward:
            value.head.weight.copy_(head.weight.float())
            value.head.bias.fill_(-scorer.offset)
        else:
            value.head.weight.zero_()
            value.head.bias.zero_()
    return value


def zero_reward(rollouts: Rollouts, packed: Any, below: Tensor | None) -> Tensor:
    """The control: no score at all, so that a round optimises the KL penalty and the ptx term only."""
    return torch.zeros(len(rollouts.queries), device=packed.input_ids.device)


def load_models(
    policy_folder: Path,
    reference_folder: Path,
    reward_folder: Path,
    config: RoundConfig,
    writer_folder: Path | None,
    device: torch.device | str = "cpu",
) -> Models:
    """The round's models, on `device`; `writer_folder`: the rollouts are answers the version stored there wrote
    (the parent, or the served version where a round builds on a version never served), so it is kept as the
    behaviour policy (the parent, with LoRA: the policy with its adapters off; the reference: its model)."""
    options = PPO_LORA if config.lora else None
    policy, tokenizer = load_causal_lm(policy_folder, options, config.train_layers, device)
    same = policy_folder.resolve() == reference_folder.resolve()
    if config.lora and same:
        reference: Any = AdapterOff(policy)
    else:
        reference, _ = load_causal_lm(reference_folder, device=device)
        reference.requires_grad_(False)
    behaviour: Any = None  # the version that wrote the served answers
    writer = writer_folder.resolve() if writer_folder is not None else None
    if writer is not None and writer == reference_folder.resolve():
        behaviour = reference  # the same weights: one pass serves both
    elif writer is not None and writer == policy_folder.resolve():
        behaviour = AdapterOff(policy) if config.lora else _frozen(policy_folder, device)
    elif writer is not None:
        behaviour = _frozen(writer, device)
    policy.eval()  # no dropout anywhere; gradients still flow
    split = layers.split_point(backbone(policy), config.train_layers)
    scorer = RewardScorer(reward_folder, config.train_layers, device)
    scorer.shares_lower = scorer.split == split and layers.same_lower(backbone(policy), backbone(scorer.model), split)
    shared = {
        name
        for name, other in (("reference", reference), ("behaviour", behaviour))
        if other is not None and layers.same_lower(backbone(policy), backbone(other), split)
    }
    reward: RewardFn = scorer if config.reward == "model" else zero_reward
    return Models(
        policy,
        reference,
        value_model(scorer, split, from_reward=config.reward == "model").to(device).eval(),
        reward,
        tokenizer,
        behaviour,
        split,
        frozenset(shared),
        scorer,
    )


def _frozen(folder: Path, device: torch.device | str) -> Any:
    model, _ = load_causal_lm(folder, device=device)
    return model.requires_grad_(False).eval()


def trainable(module: Any) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def iteration_rows(n_items: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """Rows of one iteration: each pass over the items is a fresh seeded permutation, cut into iterations in
    order, so that every item comes once per pass (an iteration that crosses a pass's end takes from the next)."""
    rows, start = [], iteration * per_iteration
    for position in range(start, start + per_iteration):
        epoch, offset = divmod(position, n_items)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(order[offset]))
    return rows


class PPORound:
    """Iterations of rollouts and PPO updates on a fixed set of training prompts (or served comparisons)."""

    def __init__(
        self,
        models: Models,
        config: RoundConfig,
        prompts: Sequence[Prompt],
        ptx: Sequence[Example] = (),
        served: Sequence[Served] = (),
    ) -> None:
        if not prompts and not served:
            raise ValueError("no training prompts")
        self.models, self.config, self.prompts, self.ptx = models, config, list(prompts), list(ptx)
        self.served = list(served)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": trainable(models.policy), "lr": config.lr},
                {"params": trainable(models.value), "lr": config.value_lr},
            ],
            weight_decay=0.0,
        )
        self.controller: rl_math.AdaptiveKLController | rl_math.FixedKLController = (
            rl_math.AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
            if config.kl_target is not None
            else rl_math.FixedKLController(config.init_kl_coef)
        )
        self.iteration = 0
        self.pad_id = pad_id(models.tokenizer)
        self.device = device_of(models.policy)

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.iteration * 7 + salt)

    def batch(self) -> list[Prompt]:
        """This iteration's prompts to sample answers to."""
        rows = iteration_rows(len(self.prompts), self.config.prompts_per_iteration, self.iteration, self.config.seed)
        return [self.prompts[i] for i in rows]

    def served_batch(self) -> Rollouts:
        """This iteration's served comparisons, all K answers of each, as rollouts."""
        rows = iteration_rows(len(self.served), self.config.prompts_per_iteration, self.iteration, self.config.seed)
        chosen = [self.served[i] for i in rows]
        return Rollouts(
            [s.prompt_ids for s in chosen for _ in s.answers],
            [a for s in chosen for a in s.answers],
            [t for s in chosen for t in s.truncated],
        )

    def ptx_batches(self, steps: int) -> list[PtxBatch]:
        """This iteration's pre-training batches for `steps` optimiser steps (`update` takes them in turn)."""
        if not self.ptx or self.config.ppo.ptx_coef <= 0 or steps < 1:
            return []
        size, pool = self.config.ptx_batch, self.config.ptx_pool
        drawn = size * (steps if pool is None else min(pool // size, steps))
        generator = self._generator(2)
        # Without repeats where the texts suffice; with, where an iteration reads more than there are.
        if drawn <= len(self.ptx):
            rows = torch.randperm(len(self.ptx), generator=generator)[:drawn].tolist()
        else:
            rows = torch.randint(len(self.ptx), (drawn,), generator=generator).tolist()
        batches = []
        for start in range(0, drawn, size):
            chosen = [self.ptx[i] for i in rows[start : start + size]]
            batch = {name: t.to(self.device) for name, t in collate(chosen, self.pad_id).items()}
            batches.append((batch["input_ids"], batch["attention_mask"], batch["labels"]))
        return batches

    def rollouts(self) -> Rollouts:
        if self.served:
            return self.served_batch()
        m, config = self.models, self.config
        # RLOO sets each answer against its siblings: without several answers to a prompt it has no baseline.
        copies = config.siblings if config.ppo.advantage == "rloo" else 1
        # Of several processes, rank 0's samples: the same seed on two GPUs may still draw another token somewhere,
        # and batches of different shapes would not sum.
        return agreed(
            lambda: sample(
                m.policy,
                [p.ids for p in self.batch() for _ in range(copies)],
                config.max_new_tokens,
                int(m.tokenizer.eos_token_id),
                self.pad_id,
                config.temperature,
                seed=config.seed * 1_000_003 + self.iteration,
            )
        )

    def step(self) -> dict[str, float]:
        """One iteration: take (or sample) rollouts, score, update. Returns its figures, timings included."""
        started = time.perf_counter()
        rollouts = self.rollouts()
        generated = time.perf_counter()
        ppo = self.config.ppo
        ptx = self.ptx_batches(ppo.steps(len(rollouts.queries)))
        figures = ppo_step(self.models, rollouts, ppo, self.controller, self.optimizer, self.pad_id, ptx)
        self.iteration += 1
        total = time.perf_counter() - started
        tokens = sum(len(r) for r in rollouts.responses)
        figures.update(
            generate_s=generated - started,
            iteration_s=total,
            rollout_tokens=float(tokens),
            generate_tokens_per_s=tokens / max(1e-9, generated - started),
            truncated=sum(rollouts.truncated) / len(rollouts.truncated),
        )
        figures["other_s"] = max(0.0, total - figures["generate_s"] - figures["score_s"] - figures["update_s"])
        return figures

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Everything the next iteration depends on, written whole or not at all (by rank 0 of several processes:
        all hold the same state, and all resume from this one file)."""
        if not world().main:
            return
        state = {
            "meta": meta,
            "iteration": self.iteration,
            "policy": trainable_state(self.models.policy),
            "value": trainable_state(self.models.value),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        save_atomic(path, state)

    def resume(self, path: Path, meta: dict[str, Any]) -> bool:
        """Continue from `path` when it belongs to this round (same meta); False when there is nothing to resume."""
        if not path.is_file():
            return False
        # Tensors and plain values: loading runs no code. Onto the CPU first: a round saved on one GPU resumes on
        # another device, and load_state_dict puts every tensor where its parameter is.
        state = torch.load(path, weights_only=True, map_location="cpu")
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
        super().__init__(
            f"{path} belongs to another round (differs in {', '.join(differs)}); "
            "delete it or pass --fresh to start over"
        )


def checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """What round the checkpoint at `path` belongs to (parent, reward model, configuration); None without one."""
    if not path.is_file():
        return None
    # Memory-mapped: the meta without reading the weights and optimiser state (GBs when training all weights).
    meta: dict[str, Any] = torch.load(path, weights_only=True, mmap=True, map_location="cpu")["meta"]
    return meta
