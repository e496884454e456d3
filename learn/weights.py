"""A version's weights in and out of the learner: loaded for training (LoRA adapters or weights on the upper
layers), stored as the server runs them (merged, bf16), with the card that says how the version was made."""

from __future__ import annotations

import copy as copy_module
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deploy.model_store import ADAPTER_FOLDER, Card, ModelStore
from learn import layers
from learn.adapters import Adapter, compose, from_peft, load_adapter, save_adapter
from learn.loop import LoopConfig, LoopResult


@dataclass(frozen=True)
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05


# The weights a learner trains and keeps, on every device: fp32. bf16 enters as the products' precision
# (learn.precision's autocast, where the device has fast bf16), so the optimiser's updates, smaller than a bf16 step
# for most weights, are not rounded away.
TRAINING_DTYPE = torch.float32


def load_causal_lm(
    folder: Path, lora: LoraOptions | None = None, train_layers: int = 0, device: torch.device | str = "cpu"
) -> tuple[Any, Any]:
    """The policy at `folder` for training on `device`, with LoRA adapters on every linear layer when `lora` is
    given. With `train_layers`, only the upper that many layers train (their adapters, or their weights); the
    layers below and the embeddings stay as they are, so that their output can be computed once per batch
    (learn.layers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=TRAINING_DTYPE)
    backbone = layers.backbone_of(model)
    split = layers.split_point(backbone, train_layers)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            task_type="CAUSAL_LM",
            **layers.lora_targets(backbone, split),
        )
        model = get_peft_model(model, config)
    elif split:
        model.get_input_embeddings().requires_grad_(False)  # tied to the LM head in small models: both stay
        layers.freeze_below(backbone, split)
    return model.to(device), tokenizer


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def as_stored(model: Any) -> Any:
    """A copy of `model` as the store will hold it and the server run it: LoRA merged in, weights rounded to bf16
    (kept in the model's dtype for the learner's arithmetic). The gate judges this copy: a round's changes smaller
    than a bf16 step vanish on saving, and larger ones move by up to half a step, so the unmerged fp32 policy is not
    the version users would get."""
    copy = copy_module.deepcopy(model)
    if hasattr(copy, "merge_and_unload"):
        copy = copy.merge_and_unload()
    dtype = next(copy.parameters()).dtype
    # Frozen, as a stored version is: what is read of it is then kept (learn.kept_logprobs) whatever trained it.
    return copy.to(torch.bfloat16).to(dtype).eval().requires_grad_(False)


def save_policy(
    model: Any, tokenizer: Any, store: ModelStore, card: Card, adapter: tuple[Adapter, str] | None = None
) -> Path:
    """Write a full model folder (LoRA merged in, bf16 like the other versions) as a new version, atomically;
    with `adapter` (the version as an adapter, and the base it applies to) that too, in `adapter/`."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    def fill(folder: Path) -> None:
        model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        if adapter is not None:
            save_adapter(adapter[0], folder / ADAPTER_FOLDER, base=adapter[1])

    return store.publish(card, fill)


def version_adapter(model: Any, store: ModelStore, parent: str, max_rank: int) -> tuple[Adapter, str] | None:
    """`model`'s LoRA adapter as an adapter on a full-weight base: on the parent where the parent has full weights
    only, composed with the parent's adapter (on the same base) where it has one; None without LoRA, or where the
    chain's rank would pass `max_rank` (the version is then a base itself)."""
    if not hasattr(model, "merge_and_unload"):
        return None
    own, base = from_peft(model), parent
    inherited = store.card(parent).details.get("adapter")
    if inherited is not None and not (store.path(parent) / ADAPTER_FOLDER).is_dir():
        return None  # the parent's adapter is gone: this version can only be a base of its own
    if inherited is not None:
        own, base = compose(load_adapter(store.path(parent) / ADAPTER_FOLDER), own), inherited["base"]
    return (own, base) if 0 < own.rank <= max_rank else None


def run_card(version: str, parent: str, made_by: str, config: LoopConfig, result: LoopResult, **details: Any) -> Card:
    """A card that says how the version was made: data, steps, settings and the loss curve (≤ 200 points)."""
    stride = max(1, len(result.losses) // 200)
    return Card(
        version=version,
        parent=parent,
        made_by=made_by,
        details={
            "steps": result.steps,
            "config": asdict(config),
            "loss_curve": result.losses[::stride],
            "loss_curve_stride": stride,
            "machine": platform.node(),
            **details,
        },
    )
