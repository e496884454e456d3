"""Frozen models' log-probabilities of answers, kept per answer for as long as the learner runs.

A round judges its new version against its parent, and against the SFT reference, on the newest held-out rankings
(learn.policy_eval.agreement). Most of those rankings were judged the round before, and the models were too: the
reference never changes, a parent that was not replaced is the same as last round's, and a promoted version is the
one the last round judged as its new version. Each of those passes reads the same answers through the same weights
again; kept here, only the answers that arrived since, and the new version, are computed.

An entry is keyed by a fingerprint of all the model's weights and of the configuration that shapes its function
(their content, as learn.lower_cache does: a version loaded again from the store finds what it computed as a
round's new version), the device and precision, and a hash of the prompt's and the answer's tokens. A model that
may still be trained (a LoRA policy with its adapters on, weights that take gradients) is never kept. The budget
counts entries: one holds an answer's log-probabilities, a few hundred floats.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from learn.lower_cache import Fingerprints, precision_of
from learn.ppo import AdapterOff

Key = tuple[str, tuple[Any, ...], str]  # (weights and architecture, precision, prompt and answer tokens)
# What of a model's configuration changes the function its weights compute (the path it was loaded from, its dtype
# on disk and the like do not: a version loaded from the store is the version a round judged).
FUNCTION_FIELDS = (
    "model_type",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "final_logit_softcapping",
    "logit_scale",
)


def frozen_weights(model: Any) -> Iterator[torch.nn.Parameter] | None:
    """The weights that make the function `model` computes, or None where it may be being trained (a LoRA policy
    with its adapters on, weights that take gradients) or is no torch module. A policy with its adapters off
    (learn.ppo.AdapterOff) computes its base's function: the base's weights, in the order a plain model of the same
    kind lists them."""
    if isinstance(model, AdapterOff):
        return (p for name, p in model.model.named_parameters() if "lora_" not in name)
    if not isinstance(model, torch.nn.Module) or hasattr(model, "peft_config"):
        return None  # a stand-in without weights, or a LoRA policy
    if any(p.requires_grad for p in model.parameters()):
        return None
    return (p for _, p in model.named_parameters())


def architecture(model: Any) -> str:
    """The model's class and the configuration that shapes its function (an AdapterOff's base model's)."""
    inner = model.model if isinstance(model, AdapterOff) else model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = getattr(inner, "config", None)
    fields = config.to_dict() if config is not None else {}
    return json.dumps([type(inner).__name__, {k: fields.get(k) for k in FUNCTION_FIELDS}], default=str)


class KeptLogprobs:
    """Answers' per-token log-probabilities under frozen models, the newest `max_entries` of them."""

    def __init__(self, max_entries: int = 32768) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[Key, Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self.fingerprints = Fingerprints()

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0

    def print_of(self, model: Any) -> str | None:
        """The fingerprint of `model`'s weights, None where it is not frozen (nothing of it is kept)."""
        weights = frozen_weights(model)
        if weights is None or self.max_entries <= 0:
            return None
        digest = hashlib.sha256(architecture(model).encode())
        for p in weights:
            digest.update(self.fingerprints.of_tensor(p))
        return digest.hexdigest()

    def get(self, key: Key) -> Tensor | None:
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return found

    def put(self, key: Key, logprobs: Tensor) -> None:
        # A copy of its own: a row of a batch's tensor would hold the whole batch for as long as it is kept.
        self.entries[key] = logprobs.detach().to("cpu", copy=True)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


def key_of(fingerprint: str, device: torch.device, query: list[int], answer: list[int]) -> Key:
    tokens = hashlib.sha256(json.dumps([query, answer]).encode()).hexdigest()  # 64 characters, not 36 bytes a token
    return (fingerprint, precision_of(device), tokens)


KEPT = KeptLogprobs()  # the process's
