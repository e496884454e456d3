"""Frozen models' log-probabilities of answers, kept per answer for as long as the learner runs.

A round judges its new version against its parent, and against the SFT reference, on the newest held-out rankings
(learn.policy_eval.agreement). Most of those rankings were judged the round before, and the models were too: the
reference never changes, a parent that was not replaced is the same as last round's, and a promoted version is the
one the last round judged as its new version. Each of those passes reads the same answers through the same weights
again; kept here, only the answers that arrived since, and the new version, are computed.

An entry is keyed by a fingerprint of all the model's weights (their content, as learn.lower_cache does: a version
loaded again from the store finds what it computed as a round's new version), the device and precision, and the
prompt's and the answer's tokens. A model still being trained (a LoRA policy with its adapters on) is never kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from learn.lower_cache import Fingerprints, precision_of
from learn.ppo import AdapterOff

Key = tuple[str, tuple[Any, ...], tuple[int, ...], tuple[int, ...]]  # (weights, precision, prompt, answer)


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
        digest = hashlib.sha256(b"logprobs")
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
        self.entries[key] = logprobs.detach().cpu()
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


def key_of(fingerprint: str, device: torch.device, query: list[int], answer: list[int]) -> Key:
    return (fingerprint, precision_of(device), tuple(query), tuple(answer))


KEPT = KeptLogprobs()  # the process's
