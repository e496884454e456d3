"""A decoder run in two parts: its frozen lower layers once per batch, its trained upper layers as often as needed.

Learning rounds train only the upper layers of a model (PPO's LoRA adapters sit in the upper `learn_train_layers`,
the reward model trains the weights of its upper `learn_rm_train_layers`, fewer), so the layers below PPO's split,
in the policy, its reference, the version being replaced and the reward model, stay the SFT reference's weights
in every version made here. Their output for a batch is
computed once (`lower`); every pass that differs (reference, behaviour policy, reward model, each update epoch)
runs the upper layers on it (`upper`), and backward stops at the split. On SmolLM2-135M with the upper 6 of 30
layers trained, an update pass costs about a third of a whole forward and backward.

The split reuses the model's own forward (embeddings, rotary positions, the attention mask) with its layer list
cut, so it holds for any decoder shaped like Llama's (`model.layers`, `model.norm`); `split_matches` checks it
against the whole forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def backbone_of(model: Any) -> Any:
    """The decoder stack (e.g. LlamaModel) of a causal LM or a scalar-head model, under a LoRA wrapper or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix)


def layer_count(backbone: Any) -> int:
    return len(backbone.layers)


def split_point(backbone: Any, train_layers: int) -> int:
    """Index of the first trained layer: the upper `train_layers` are trained (0: all of them)."""
    n = layer_count(backbone)
    return 0 if train_layers <= 0 else max(0, n - train_layers)


@contextmanager
def _cut(backbone: Any, start: int, stop: int | None, norm: bool) -> Iterator[None]:
    layers, final_norm = backbone.layers, backbone.norm
    backbone.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not norm:
        backbone.norm = torch.nn.Identity()
    try:
        yield
    finally:
        backbone.layers, backbone.norm = layers, final_norm


def lower(backbone: Any, split: int, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """(B, L, H) hidden states after layers [0, split): the embeddings when split is 0."""
    with _cut(backbone, 0, split, norm=False):
        out: Tensor = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
    return out


def middle(
    backbone: Any, start: int, stop: int, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor
) -> Tensor:
    """(B, L, H) hidden states after layers [start, stop) from those after layers [0, start) (`lower`'s output)."""
    return _from_hidden(backbone, start, stop, False, hidden, attention_mask, position_ids)


def upper(backbone: Any, split: int, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """(B, L, H) final hidden states (normed) from the output of `lower`: layers [split, n), then the norm."""
    return _from_hidden(backbone, split, None, True, hidden, attention_mask, position_ids)


def _from_hidden(
    backbone: Any,
    start: int,
    stop: int | None,
    norm: bool,
    hidden: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
) -> Tensor:
    with _cut(backbone, start, stop, norm=norm):
        out: Tensor = backbone(
            inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
    return out


def final_hidden(
    backbone: Any,
    split: int,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    below: Tensor | None = None,
) -> Tensor:
    """(B, L, H) final hidden states: the upper layers on `below` when given (the output of `lower` for this
    batch), else the whole stack."""
    if below is None:
        out: Tensor = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return out
    return upper(backbone, split, below, attention_mask, position_ids)


def lora_targets(backbone: Any, split: int) -> dict[str, Any]:
    """LoraConfig arguments for adapters on every linear layer of the layers from `split` up (all of them at 0).

    PEFT's `all-linear` cannot be combined with a layer range, so the linear layers are named: those of one decoder
    layer, by their last name part (q_proj, ..., down_proj in Llama)."""
    if not split:
        return {"target_modules": "all-linear"}
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in backbone.layers[0].named_modules()
            if isinstance(module, torch.nn.Linear)
        }
    )
    return {"target_modules": names, "layers_to_transform": list(range(split, layer_count(backbone)))}


def lower_parameters(backbone: Any, split: int) -> list[Tensor]:
    """The weights `lower` computes with: embeddings and layers [0, split), in order."""
    params = [p for p in backbone.embed_tokens.parameters()]
    for layer in list(backbone.layers)[:split]:
        params += [p for name, p in layer.named_parameters() if "lora_" not in name]
    return params


def same_lower(a: Any, b: Any, split: int) -> bool:
    """Whether two backbones compute the same lower layers (the same weights), so one `lower` serves both."""
    if a is b:
        return True
    if layer_count(a) != layer_count(b) or split > layer_count(a):
        return False
    left, right = lower_parameters(a, split), lower_parameters(b, split)
    if len(left) != len(right):
        return False
    with torch.no_grad():
        return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(left, right, strict=True))


def freeze_below(backbone: Any, split: int) -> None:
    """Stop training the embeddings and layers [0, split) (the reward model's partial fine-tuning)."""
    for p in backbone.embed_tokens.parameters():
        p.requires_grad_(False)
    for layer in list(backbone.layers)[:split]:
        layer.requires_grad_(False)


@torch.no_grad()
def split_matches(
    backbone: Any, split: int, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, atol: float = 1e-4
) -> bool:
    """The split forward equals the whole one on this batch (where a model's forward does more than Llama's,
    such as scaling the embeddings, it would not)."""
    whole = final_hidden(backbone, split, input_ids, attention_mask, position_ids)
    below = lower(backbone, split, input_ids, attention_mask, position_ids)
    parts = upper(backbone, split, below, attention_mask, position_ids)
    real = attention_mask.bool()
    return bool(torch.allclose(whole[real], parts[real], atol=atol))
