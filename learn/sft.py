"""Supervised fine-tuning on demonstrations, and continued pre-training on plain text: one code path.

The difference between the two is only in the labels (learn.data): SFT trains on answer tokens, pre-training on
every token. The language-model loss here is also the figure of PPO's pre-training (ptx) term and of the
evaluation's fluency check (learn.policy_eval.lm_loss_of, which computes it for less); learn.weights loads the
model and stores the result as a new policy version.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learn.data import IGNORE, Example, right_pad
from learn.loop import LoopConfig, LoopResult, StepFn, run_loop
from learn.trainlog import MetricsLog
from learn.weights import pad_id


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


def train_lm(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    config: LoopConfig,
    log: MetricsLog,
    description: str,
    checkpoint: Path | None = None,
    show_progress: bool = True,
) -> LoopResult:
    if not examples:
        raise ValueError("no training examples")
    step = lm_step(model, examples, pad_id(tokenizer))

    def tokens(indices: list[int]) -> int:  # the LM loss is a mean over the predicted (labelled) tokens
        return sum(sum(1 for label in examples[i].labels[1:] if label != IGNORE) for i in indices)

    return run_loop(model, len(examples), step, config, log, description, checkpoint, show_progress, units=tokens)
