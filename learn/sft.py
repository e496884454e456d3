"""Supervised fine-tuning on demonstrations, and continued pre-training on plain text: one code path.

The difference between the two is only in the labels (learn.data): SFT trains on answer tokens, pre-training on
every token. The result is written to the model store as a new policy version, atomically, with a card.
"""

from __future__ import annotations

import copy as copy_module
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deploy.model_store import Card, ModelStore
from learn import layers
from learn.data import IGNORE, Example, right_pad
from learn.loop import LoopConfig, LoopResult, StepFn, run_loop
from learn.trainlog import MetricsLog


@dataclass(frozen=True)
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05


def training_dtype() -> torch.dtype:
    # bf16 where it helps: on a GPU. On CPUs without AMX, eager bf16 matmuls are slower than fp32.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_causal_lm(folder: Path, lora: LoraOptions | None = None, train_layers: int = 0) -> tuple[Any, Any]:
    """The policy at `folder` for training, with LoRA adapters on every linear layer when `lora` is given. With
    `train_layers`, only the upper that many layers train (their adapters, or their weights); the layers below
    and the embeddings stay as they are, so that their output can be computed once per batch (learn.layers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=training_dtype())
    backbone = layers.backbone_of(model)
    split = layers.split_point(backbone, train_layers)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                            **layers.lora_targets(backbone, split))  # fmt: skip
        model = get_peft_model(model, config)
    elif split:
        model.get_input_embeddings().requires_grad_(False)  # tied to the LM head in small models: both stay
        layers.freeze_below(backbone, split)
    return model, tokenizer


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask, and labels with IGNORE on the padding."""
    ids, mask = right_pad([e.input_ids for e in examples], pad_id)
    labels, _ = right_pad([e.labels for e in examples], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens of the batch, computed on the model's device."""
    device = next(model.parameters()).device
    batch = {name: t.to(device) for name, t in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )


def lm_step(model: Any, examples: Sequence[Example], pad_id: int) -> StepFn:
    def step(indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        batch = collate([examples[i] for i in indices], pad_id)
        return lm_loss(model, batch), {"tokens": float((batch["labels"] != IGNORE).sum())}

    return step


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def train_lm(
    model: Any, tokenizer: Any, examples: Sequence[Example], config: LoopConfig, log: MetricsLog,
    description: str, checkpoint: Path | None = None, show_progress: bool = True,
) -> LoopResult:  # fmt: skip
    if not examples:
        raise ValueError("no training examples")
    step = lm_step(model, examples, pad_id(tokenizer))
    return run_loop(model, len(examples), step, config, log, description, checkpoint, show_progress)


@torch.no_grad()
def evaluate_lm(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8) -> float:
    """Mean loss per labelled token over `examples` (held-out text or answers)."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id(tokenizer))
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(lm_loss(model, batch)) * n
        tokens += n
    return total / max(1, tokens)


def as_stored(model: Any) -> Any:
    """A copy of `model` as the store will hold it and the server run it: LoRA merged in, weights rounded to bf16
    (kept in the model's dtype for the learner's arithmetic). The gate judges this copy: a round's changes smaller
    than a bf16 step vanish on saving, and larger ones move by up to half a step, so the unmerged fp32 policy is not
    the version users would get."""
    copy = copy_module.deepcopy(model)
    if hasattr(copy, "merge_and_unload"):
        copy = copy.merge_and_unload()
    dtype = next(copy.parameters()).dtype
    return copy.to(torch.bfloat16).to(dtype).eval()


def save_policy(model: Any, tokenizer: Any, store: ModelStore, card: Card) -> Path:
    """Write a full model folder (LoRA merged in, bf16 like the other versions) as a new version, atomically."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    def fill(folder: Path) -> None:
        model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return store.publish(card, fill)


def run_card(version: str, parent: str, made_by: str, config: LoopConfig, result: LoopResult,
             **details: Any) -> Card:  # fmt: skip
    """A card that says how the version was made: data, steps, settings and the loss curve (≤ 200 points)."""
    stride = max(1, len(result.losses) // 200)
    return Card(version=version, parent=parent, made_by=made_by, details={
        "steps": result.steps, "config": asdict(config), "loss_curve": result.losses[::stride],
        "loss_curve_stride": stride, "machine": platform.node(), **details,
    })  # fmt: skip
