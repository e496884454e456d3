"""The held-out LM loss a round computes (learn.policy_eval.lm_loss_of): the figure of one whole pass over every
text (learn.sft.lm_loss), whatever the split, the batches' order and the lower-layer cache."""

from __future__ import annotations

from typing import Any

import torch

from learn import lower_cache
from learn.data import IGNORE, Example
from learn.policy_eval import lm_loss_of
from learn.sft import collate, lm_loss
from tests.tiny import small_llama

PAD = 0


def examples() -> list[Example]:
    """Eleven texts (not a whole number of batches of 8), each a prompt that is not scored and an answer that is:
    prompts longer than their answers and shorter, in no order of length."""
    lengths = [(9, 3), (2, 7), (14, 1), (5, 5), (3, 12), (20, 4), (1, 2), (8, 8), (11, 6), (4, 1), (6, 15)]
    found = []
    generator = torch.Generator().manual_seed(3)
    for prompt, answer in lengths:
        ids = torch.randint(1, 64, (prompt + answer,), generator=generator).tolist()
        found.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return found


def whole_pass(model: Any, held: list[Example]) -> float:
    """The mean loss over every labelled token, all texts in one right-padded batch through the whole model."""
    with torch.no_grad():
        return float(lm_loss(model, collate(held, PAD)))


def test_the_loss_is_a_whole_passes_at_every_split() -> None:
    model, held = small_llama(layers=4), examples()
    expected = whole_pass(model, held)
    for split in (0, 2, 3):
        assert abs(lm_loss_of(model, held, PAD, split) - expected) < 1e-5


def test_a_version_that_shares_the_lower_layers_runs_only_its_own() -> None:
    reference, version = small_llama(layers=4), small_llama(layers=4)
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a round's version: the layers from 2 up trained, those below the reference's
        for layer in version.model.layers[2:]:
            layer.mlp.down_proj.weight.add_(torch.randn(layer.mlp.down_proj.weight.shape, generator=noise))
    held = examples()
    lower_cache.CACHE.configure(2**24, [2])
    lm_loss_of(reference, held, PAD, split=2)
    misses = lower_cache.CACHE.misses
    loss = lm_loss_of(version, held, PAD, split=2)
    assert lower_cache.CACHE.misses == misses  # every text's lower states were the reference's
    assert lower_cache.CACHE.hits >= len(held)
    expected = whole_pass(version, held)
    assert abs(loss - expected) < 1e-5
    assert abs(loss - lm_loss_of(reference, held, PAD, split=2)) > 0.01  # the upper layers' change is in it
