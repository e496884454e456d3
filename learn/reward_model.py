"""The reward model: the policy's backbone with a scalar head, scoring prompt + answer from its tokens' final states:
the last real token's, their mean, or a soft maximum over the answer's (`learn.rl_math.sequence_scores`). The readout
is saved in the model's config.json (`score_readout`), so whoever loads a reward model reads its scores the way it was
trained.

Training takes whole prompts per batch: each of a prompt's K answers goes through the model once per step and all
C(K,2) pairs are formed from the K scores (learn.rl_math.kwise_ranking_loss), where a pairwise trainer would run
2·C(K,2) forwards. The reward is normalised so that the reference policy's answers score 0 on average
(InstructGPT); the offset is stored with the model and subtracted by `RewardScorer`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deploy.model_store import Card, ModelStore
from feedback.ranking import pairs
from learn import layers, lower_cache
from learn.data import by_length, right_pad
from learn.loop import LoopConfig, LoopResult, StepHook, run_loop
from learn.rl_math import (
    ANSWER_READOUTS,
    READOUTS,
    kwise_ranking_loss,
    pack_rankings,
    pairwise_accuracy,
    sequence_scores,
)
from learn.rm_data import RankedGroup
from learn.trainlog import MetricsLog
from learn.weights import TRAINING_DTYPE, LoraOptions

NORM_FILE = "reward_norm.json"
READOUT_KEY = "score_readout"  # in the model's config; absent: "last", as every reward model before it read
SCORE_ROWS = 4  # sequences per pass of `score_ids`: few, so that each pass is padded to a length close to its own


def load_reward_model(
    folder: Path,
    lora: LoraOptions | None = None,
    dtype: torch.dtype | None = None,
    train_layers: int = 0,
    device: torch.device | str = "cpu",
    readout: str | None = None,
) -> tuple[Any, Any]:
    """A scalar-head model on `folder` (a policy: new random head; a reward model: its trained head), in `dtype`
    (default: the learner's training precision) on `device`. With `train_layers`, only the upper that many layers
    (and the final norm and the head) train; the layers below stay the SFT reference's (learn.layers). `readout`
    (learn.rl_math.READOUTS) sets how it scores from now on; None keeps the folder's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype or TRAINING_DTYPE)
    model.config.pad_token_id = tokenizer.pad_token_id
    if readout is not None:
        if readout not in READOUTS:
            raise ValueError(f"unknown reward-model readout {readout!r}: one of {', '.join(READOUTS)}")
        setattr(model.config, READOUT_KEY, readout)
    split = layers.split_point(layers.backbone_of(model), train_layers)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            task_type="SEQ_CLS",
            **layers.lora_targets(layers.backbone_of(model), split),
        )
        model = get_peft_model(model, config)
    elif split:
        layers.freeze_below(layers.backbone_of(model), split)
    return model.to(device), tokenizer


def readout_of(model: Any) -> str:
    """How `model` reads its score (learn.rl_math.sequence_scores), as its config says."""
    return str(getattr(model.config, READOUT_KEY, "last"))


def _parts(model: Any) -> tuple[Any, Any]:
    """(backbone, head) of a sequence-classification model, under a LoRA wrapper or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return layers.backbone_of(model), inner.score


def score_ids(
    model: Any,
    sequences: Sequence[list[int]],
    pad_id: int,
    split: int = 0,
    lowers: Sequence[Tensor] | None = None,
    rows: int = SCORE_ROWS,
    answer_lens: Sequence[int] | None = None,
) -> Tensor:
    """(N,) raw scores, read as the model reads them (`readout_of`); on the model's device. `lowers`: each sequence's
    hidden states below layer `split` (`compute_lowers`), so that only the layers from `split` up run.
    `answer_lens`: how many tokens at the end of each sequence are the answer, for a readout that pools the answer
    (learn.rl_math.sequence_scores); None: unknown, the whole sequence is pooled.

    The sequences run `rows` at a time in order of length, each group padded to its own longest: a batch of a
    few prompts' answers mixes lengths, and one padded block did the longest answer's work for every answer."""
    groups = by_length([len(s) for s in sequences], rows)
    parts = [
        _scores(
            model,
            [sequences[i] for i in g],
            pad_id,
            split,
            None if lowers is None else [lowers[i] for i in g],
            None if answer_lens is None else [answer_lens[i] for i in g],
        )
        for g in groups
    ]
    if not parts:
        return torch.zeros(0)
    # Back to the callers' order; cat then index keeps the autograd graph whole (the loss differentiates these).
    order = torch.tensor([i for g in groups for i in g], dtype=torch.long)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    scores: Tensor = torch.cat(parts)[inverse.to(parts[0].device)]
    return scores


def _scores(
    model: Any,
    sequences: Sequence[list[int]],
    pad_id: int,
    split: int,
    lowers: Sequence[Tensor] | None,
    answer_lens: Sequence[int] | None,
) -> Tensor:
    hidden, mask = final_states(model, sequences, pad_id, split, lowers)
    return read(model, hidden, mask, None if answer_lens is None else right_padded_answers(mask, answer_lens))


def right_padded_answers(mask: Tensor, answer_lens: Sequence[int]) -> Tensor:
    """(N, L) 1 at each right-padded sequence's last `answer_lens[n]` real tokens (its answer), else 0."""
    ends = mask.sum(dim=1, keepdim=True)
    starts = ends - torch.tensor(list(answer_lens), device=mask.device).unsqueeze(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return ((positions >= starts) & (positions < ends)).to(mask.dtype)


def read(model: Any, hidden: Tensor, mask: Tensor, answer: Tensor | None = None) -> Tensor:
    """(N,) raw scores from final hidden states (N, L, H), their mask and their answers' mask (sequence frame,
    padding on either side; learn.rl_math.sequence_scores)."""
    # Padding's states zeroed before the head: one NaN there (a fully masked row) would reach the head's gradient.
    hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    per_token = _parts(model)[1](hidden).squeeze(-1).float()
    return sequence_scores(per_token, mask, readout_of(model), answer)


def final_states(
    model: Any, sequences: Sequence[list[int]], pad_id: int, split: int, lowers: Sequence[Tensor] | None
) -> tuple[Tensor, Tensor]:
    """(N, L, H) final hidden states of the sequences, right-padded, and their (N, L) attention mask; `lowers` as
    in `score_ids`."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in right_pad(sequences, pad_id))
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    below = None if lowers is None else _pad_lowers(lowers, ids.shape[1]).to(device)
    hidden = layers.final_hidden(_parts(model)[0], split, ids, mask, positions, below)
    return hidden, mask


def _pad_lowers(lowers: Sequence[Tensor], width: int) -> Tensor:
    """(N, width, H) from per-sequence (L_i, H): zeros after each (right padding, which the mask hides)."""
    out = torch.zeros((len(lowers), width, lowers[0].shape[-1]), dtype=lowers[0].dtype, device=lowers[0].device)
    for row, hidden in enumerate(lowers):
        out[row, : hidden.shape[0]] = hidden
    return out


@torch.no_grad()
def compute_lowers(
    model: Any, sequences: Sequence[list[int]], pad_id: int, split: int, batch: int = 16
) -> list[Tensor]:
    """Each sequence's hidden states below layer `split`, (L_i, H), computed once: they do not change while only
    the upper layers train, so every epoch reuses them. Batches of similar length, so that little is padding."""
    backbone, device = layers.backbone_of(model), next(model.parameters()).device
    out: dict[int, Tensor] = {}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        ids, mask = (t.to(device) for t in right_pad([sequences[i] for i in rows], pad_id))
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        hidden = lower_cache.lower(backbone, split, ids, mask, positions)
        for n, i in enumerate(rows):
            out[i] = hidden[n, : len(sequences[i])].clone()
    return [out[i] for i in range(len(sequences))]


def group_loss(
    model: Any,
    groups: Sequence[RankedGroup],
    pad_id: int,
    margin: float = 0.0,
    split: int = 0,
    lowers: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """K-wise loss over whole prompts; returns (loss, accuracy, scores). `lowers`: as in `score_ids`, one per
    answer of `groups` in order."""
    sequences = [answer for g in groups for answer in g.answers]
    lens = answer_lens_of(groups, readout_of(model))
    scores = score_ids(model, sequences, pad_id, split, lowers, answer_lens=lens)
    packed_groups, ranks = (t.to(scores.device) for t in pack_rankings([(len(g.answers), g.tiers) for g in groups]))
    loss = kwise_ranking_loss(scores, packed_groups, ranks, margin)
    return loss, pairwise_accuracy(scores.detach(), packed_groups, ranks), scores.detach()


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    mean: float
    std: float
    groups: int
    pairs: int = 0  # answer pairs with a preferred side that the accuracy was measured on: how far to trust it

    def figures(self, prefix: str = "eval_") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in vars(self).items()}


@torch.no_grad()
def held_out_accuracy(
    model: Any,
    groups: Sequence[RankedGroup],
    pad_id: int,
    batch: int = 8,
    split: int = 0,
    lowers: Sequence[Sequence[Tensor]] | None = None,
) -> Evaluation:
    """Pairwise accuracy (over all pairs), mean K-wise loss (over prompts), and the scores' mean and std.
    `lowers`: each group's answers' lower hidden states (as `train_reward_model` takes them); without them, at a
    `split` the model is frozen below, a chunk's are computed (or read, learn.lower_cache) as it is scored."""
    model.eval()
    correct = total = 0.0
    losses: list[float] = []
    all_scores: list[Tensor] = []
    for start in range(0, len(groups), batch):
        chunk = groups[start : start + batch]
        chunk_lowers = (
            lowers[start : start + batch] if lowers is not None else _chunk_lowers(model, chunk, pad_id, split)
        )
        below = None if chunk_lowers is None else [h for g in chunk_lowers for h in g]
        loss, accuracy, scores = group_loss(model, chunk, pad_id, split=split if below else 0, lowers=below)
        n_pairs = sum(len(pairs(g.tiers)) for g in chunk)
        if n_pairs:
            correct += float(accuracy) * n_pairs
            total += n_pairs
        losses += [float(loss)] * len(chunk)
        all_scores.append(scores)
    scores = torch.cat(all_scores) if all_scores else torch.zeros(0)
    return Evaluation(
        correct / total if total else float("nan"),
        sum(losses) / max(1, len(losses)),
        float(scores.mean()) if scores.numel() else 0.0,
        float(scores.std()) if scores.numel() > 1 else 0.0,
        len(groups),
        int(total),
    )


def _chunk_lowers(
    model: Any, groups: Sequence[RankedGroup], pad_id: int, split: int
) -> Sequence[Sequence[Tensor]] | None:
    """The groups' lower states where the model is frozen below `split` (and `split` is that layer), else None."""
    if not split or frozen_below(model) != split:
        return None
    return group_lowers(model, groups, pad_id)


@dataclass(frozen=True)
class Norm:
    """What a saved reward model's scores are read against: `offset`, subtracted from every score (the reference's
    answers then score 0 on average); `spread`, the standard deviation of those answers' scores, the size of a
    difference the model makes (PPO's advantages are never divided by less than a share of it,
    learn.ppo.PPOConfig.advantage_floor); `basis`, which answers both were measured on."""

    offset: float
    spread: float
    basis: str


@torch.no_grad()
def reference_norm(
    model: Any,
    groups: Sequence[RankedGroup],
    pad_id: int,
    reference: str | None,
    batch: int = 16,
    lowers: Sequence[Sequence[Tensor]] | None = None,
) -> Norm:
    """The mean raw score of the reference policy's answers (all answers when none of them are the reference's),
    and their spread. `lowers`: as `train_reward_model` takes them, one list per group."""
    own = [i for i, g in enumerate(groups) if reference is not None and g.policy_version == reference]
    chosen, basis = (own, "reference answers") if own else (list(range(len(groups))), "all answers")
    sequences = [a for i in chosen for a in groups[i].answers]
    if not sequences:
        return Norm(0.0, 0.0, "none")
    below = None if lowers is None else [h for i in chosen for h in lowers[i]]
    split = frozen_below(model) if below is not None else 0
    lens = answer_lens_of([groups[i] for i in chosen], readout_of(model))
    scores = torch.cat(
        [
            score_ids(
                model,
                sequences[i : i + batch],
                pad_id,
                split,
                None if below is None else below[i : i + batch],
                answer_lens=None if lens is None else lens[i : i + batch],
            )
            for i in range(0, len(sequences), batch)
        ]
    )
    return Norm(float(scores.mean()), float(scores.std()) if scores.numel() > 1 else 0.0, basis)


def write_norm(folder: Path, norm: Norm) -> None:
    (folder / NORM_FILE).write_text(json.dumps(vars(norm)))


def read_norm(folder: Path) -> Norm:
    """The folder's norm; a model saved before spreads were kept reads spread 0 (no floor), none at all offset 0."""
    norm = folder / NORM_FILE
    found = json.loads(norm.read_text()) if norm.is_file() else {}
    return Norm(float(found.get("offset", 0.0)), float(found.get("spread", 0.0)), str(found.get("basis", "none")))


class RewardScorer:
    """A saved reward model scoring prompt + answer token ids, with the normalisation applied: PPO's reward
    (`__call__`, on a packed batch, learn.ppo.RewardFn) and plain sequences (`sequences`)."""

    def __init__(self, folder: Path, train_layers: int = 0, device: torch.device | str = "cpu") -> None:
        self.model, self.tokenizer = load_reward_model(folder, device=device)
        self.model.eval()
        self.norm = read_norm(folder)
        self.split = layers.split_point(layers.backbone_of(self.model), train_layers)
        self.shares_lower = False  # whether the policy's lower hidden states are this model's too (learn.ppo_run)

    @property
    def offset(self) -> float:
        return self.norm.offset

    @torch.no_grad()
    def sequences(self, sequences: Sequence[list[int]], answer_lens: Sequence[int] | None = None) -> Tensor:
        pad = int(self.tokenizer.pad_token_id)
        return score_ids(self.model, sequences, pad, answer_lens=answer_lens) - self.offset

    @property
    def backbone(self) -> Any:
        return _parts(self.model)[0]

    @torch.no_grad()
    def __call__(self, rollouts: Any, packed: Any, below: Tensor | None) -> Tensor:
        """(B,) normalised scores of a learn.ppo.Packed batch (prompt and answer, as the model was trained)."""
        hidden = layers.final_hidden(
            self.backbone,
            self.split,
            packed.input_ids,
            packed.attention_mask,
            packed.position_ids,
            below if self.shares_lower else None,
        )
        return self.from_hidden(hidden, packed)

    @torch.no_grad()
    def from_hidden(self, hidden: Tensor, packed: Any) -> Tensor:
        """(B,) normalised scores from this model's final hidden states (B, L, H) of a packed batch."""
        return read(self.model, hidden, packed.attention_mask, packed.answer_positions()) - self.offset


def train_reward_model(
    model: Any,
    tokenizer: Any,
    train: Sequence[RankedGroup],
    held_out: Sequence[RankedGroup],
    config: LoopConfig,
    log: MetricsLog,
    checkpoint: Path | None = None,
    show_progress: bool = True,
    lowers: Sequence[Sequence[Tensor]] | None = None,
    on_step: StepHook | None = None,
) -> tuple[LoopResult, Evaluation]:
    """Train on whole prompts (`config.batch_size` prompts per step), then evaluate on the held-out prompts.

    Where only the upper layers train (`load_reward_model`'s `train_layers`), each answer's lower hidden states are
    computed once before the first step (or given: `lowers`, per group) and every step runs the upper layers only.
    """
    if not train:
        raise ValueError("no ranked prompts to train on")
    pad = int(tokenizer.pad_token_id)
    split = frozen_below(model)
    cached = (list(lowers) if lowers is not None else group_lowers(model, train, pad)) if split else None

    def step(indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        lowers = None if cached is None else [h for i in indices for h in cached[i]]
        loss, accuracy, scores = group_loss(model, [train[i] for i in indices], pad, split=split, lowers=lowers)
        return loss, {
            "accuracy": float(accuracy),
            "score_mean": float(scores.mean()),
            "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        }

    def prompts(indices: list[int]) -> int:  # the K-wise loss is a mean over prompts with a ranked pair
        return sum(1 for i in indices if pairs(train[i].tiers))

    result = run_loop(
        model, len(train), step, config, log, "reward model", checkpoint, show_progress, on_step, units=prompts
    )
    # The held-out rankings' lower states are mostly the last round's (learn.lower_cache): only the trained layers run.
    evaluation = (
        held_out_accuracy(model, held_out, pad, split=split)
        if held_out
        else Evaluation(float("nan"), float("nan"), 0.0, 0.0, 0)
    )
    log.write(result.steps, **evaluation.figures())
    return result, evaluation


def answer_lens_of(groups: Sequence[RankedGroup], readout: str) -> list[int] | None:
    """Each answer's length in tokens, in the order of the groups' answers; None where a group does not know them.
    Raises ValueError where `readout` pools the answer and they are unknown: PPO scores answers in that frame, and
    a model trained on prompt and answer pooled together would be read in another than it learned."""
    if all(len(g.answer_lens) == len(g.answers) for g in groups):
        return [n for g in groups for n in g.answer_lens]
    if readout in ANSWER_READOUTS:
        raise ValueError(f"the {readout!r} readout needs each answer's length in tokens: these rankings lack them")
    return None


def group_lowers(model: Any, groups: Sequence[RankedGroup], pad_id: int) -> list[list[Tensor]] | None:
    """Each group's answers' hidden states below the model's trained layers (`compute_lowers`), one list per
    group; None where every layer trains."""
    split = frozen_below(model)
    if not split:
        return None
    flat = compute_lowers(model, [a for g in groups for a in g.answers], pad_id, split)
    offsets = [0, *itertools.accumulate(len(g.answers) for g in groups)]
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(groups))]


def frozen_below(model: Any) -> int:
    """The first layer that trains: layers below it (and the embeddings) have no trainable weights."""
    backbone = layers.backbone_of(model)
    if any(p.requires_grad for p in backbone.embed_tokens.parameters()):
        return 0
    for index, layer in enumerate(backbone.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return layers.layer_count(backbone)


def save_reward_model(model: Any, tokenizer: Any, store: ModelStore, card: Card, norm: Norm) -> Path:
    """Write the model (LoRA merged in, in its training precision so scores round-trip exactly) and its norm."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    def fill(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_norm(folder, norm)

    return store.publish(card, fill)
