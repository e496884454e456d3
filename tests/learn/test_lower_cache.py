"""The lower-layer cache gives what a plain pass gives, whatever the batch, and computes only what it lacks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from learn import layers
from learn.lower_cache import LowerCache
from tests.tiny import small_llama

PAD = 0
SEQUENCES = [[5, 9, 12, 7, 3, 8, 21], [4, 4, 30], [11, 2, 6, 6, 19]]


@pytest.fixture
def backbone() -> Any:
    """A 4-layer llama (hidden 32), the same in every run."""
    model = small_llama(layers=4)
    model.requires_grad_(False)
    return layers.backbone_of(model)


def batch(sequences: list[list[int]], left: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Padded ids, mask and positions (counting from 0 at each row's first real token)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    positions = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        at = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, at], mask[i, at], positions[i, at] = torch.tensor(s), 1, torch.arange(len(s))
    return ids, mask, positions


def plain(backbone: Any, split: int, sequence: list[int]) -> Tensor:
    """(n, H) the sequence's states below `split`, computed alone."""
    ids, mask, positions = batch([sequence])
    return layers.lower(backbone, split, ids, mask, positions)[0]


def real_rows(out: Tensor, mask: Tensor) -> list[Tensor]:
    return [out[i][mask[i].bool()] for i in range(out.shape[0])]


def test_rows_equal_a_plain_pass_and_are_found_again_in_another_batch(backbone: Any) -> None:
    cache = LowerCache(2**20)
    ids, mask, positions = batch(SEQUENCES)
    out = cache.lower(backbone, 3, ids, mask, positions)
    for row, sequence in zip(real_rows(out, mask), SEQUENCES, strict=True):
        torch.testing.assert_close(row, plain(backbone, 3, sequence), atol=1e-5, rtol=1e-5)
    assert float(out[1, 3:].abs().sum()) == 0.0  # the padding after the short row
    assert (cache.hits, cache.misses, len(cache.entries)) == (0, 3, 3)

    alone = batch([SEQUENCES[1]])  # the short row again, in a batch of its own width
    again = cache.lower(backbone, 3, *alone)
    torch.testing.assert_close(again[0], out[1, :3])
    assert (cache.hits, cache.misses, len(cache.entries)) == (1, 3, 3)


def test_left_padding_finds_what_right_padding_kept(backbone: Any) -> None:
    cache = LowerCache(2**20)
    right = batch(SEQUENCES)
    cache.lower(backbone, 2, *right)
    ids, mask, positions = batch(SEQUENCES, left=True)
    out = cache.lower(backbone, 2, ids, mask, positions)
    assert cache.hits == 3
    for row, sequence in zip(real_rows(out, mask), SEQUENCES, strict=True):
        torch.testing.assert_close(row, plain(backbone, 2, sequence), atol=1e-5, rtol=1e-5)


def test_a_higher_split_runs_only_the_layers_above_the_kept_one(backbone: Any, monkeypatch: Any) -> None:
    cache = LowerCache(2**20)
    cache.configure(2**20, trained_tops=[2])  # PPO's split: 4 layers - 2 = 2
    ids, mask, positions = batch(SEQUENCES)
    cache.lower(backbone, 2, ids, mask, positions)
    ran: list[tuple[int, int]] = []
    middle = layers.middle

    def counted(b: Any, start: int, stop: int, *rest: Any) -> Tensor:
        ran.append((start, stop))
        return middle(b, start, stop, *rest)

    def refused(*_: Any) -> Tensor:
        raise AssertionError("the kept split's layers ran again")

    monkeypatch.setattr(layers, "middle", counted)
    monkeypatch.setattr(layers, "lower", refused)
    out = cache.lower(backbone, 3, ids, mask, positions)
    assert ran == [(2, 3)]
    monkeypatch.undo()
    for row, sequence in zip(real_rows(out, mask), SEQUENCES, strict=True):
        torch.testing.assert_close(row, plain(backbone, 3, sequence), atol=1e-5, rtol=1e-5)


def test_a_split_computed_from_scratch_keeps_the_configured_split_below_it(backbone: Any) -> None:
    cache = LowerCache()
    cache.configure(2**20, trained_tops=[2, 1])  # splits 2 (PPO's) and 3 (the reward model's)
    ids, mask, positions = batch(SEQUENCES)
    cache.lower(backbone, 3, ids, mask, positions)
    assert len(cache.entries) == 6  # each row at 2 and at 3
    out = cache.lower(backbone, 2, ids, mask, positions)
    assert cache.hits == 3
    for row, sequence in zip(real_rows(out, mask), SEQUENCES, strict=True):
        torch.testing.assert_close(row, plain(backbone, 2, sequence), atol=1e-5, rtol=1e-5)


def test_changed_lower_weights_are_not_served_the_old_states(backbone: Any) -> None:
    cache = LowerCache(2**20)
    ids, mask, positions = batch(SEQUENCES)
    before = cache.lower(backbone, 2, ids, mask, positions)
    with torch.no_grad():
        backbone.layers[0].mlp.down_proj.weight.add_(0.05)
    after = cache.lower(backbone, 2, ids, mask, positions)
    assert cache.hits == 0
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[0], plain(backbone, 2, SEQUENCES[0]), atol=1e-5, rtol=1e-5)


def test_upper_weights_do_not_touch_the_lower_states(backbone: Any) -> None:
    cache = LowerCache(2**20)
    ids, mask, positions = batch(SEQUENCES)
    cache.lower(backbone, 2, ids, mask, positions)
    with torch.no_grad():
        backbone.layers[3].mlp.down_proj.weight.add_(0.05)
    cache.lower(backbone, 2, ids, mask, positions)
    assert cache.hits == 3


def test_the_budget_evicts_the_least_recently_used(backbone: Any) -> None:
    one = plain(backbone, 2, SEQUENCES[0])
    cache = LowerCache(2 * one.numel() * one.element_size())  # two of the longest row
    for sequence in SEQUENCES:
        cache.lower(backbone, 2, *batch([sequence]))
    assert cache.bytes <= cache.max_bytes
    assert len(cache.entries) == 2
    cache.lower(backbone, 2, *batch([SEQUENCES[0]]))  # the oldest: gone
    assert cache.hits == 0
    cache.lower(backbone, 2, *batch([SEQUENCES[2]]))  # the newest: kept
    assert cache.hits == 1


def test_off_trained_below_or_a_row_with_holes_is_a_plain_pass(backbone: Any) -> None:
    ids, mask, positions = batch(SEQUENCES)
    off = LowerCache(0)
    off.lower(backbone, 2, ids, mask, positions)
    assert not off.entries

    cache = LowerCache(2**20)
    holed = mask.clone()
    holed[0, 2] = 0
    cache.lower(backbone, 2, ids, holed, positions)
    assert not cache.entries

    backbone.layers[0].requires_grad_(True)  # a full fine-tuning pass: gradients must reach the lower layers
    out = cache.lower(backbone, 2, ids, mask, positions)
    assert out.requires_grad and not cache.entries


def test_other_positions_or_precision_are_other_entries(backbone: Any) -> None:
    cache = LowerCache(2**20)
    ids, mask, positions = batch(SEQUENCES)
    cache.lower(backbone, 2, ids, mask, positions)
    # The same tokens further on: other entries (rotary positions would give the same states; absolute ones not).
    cache.lower(backbone, 2, ids, mask, positions + 5 * mask)
    assert (cache.hits, len(cache.entries)) == (0, 6)
    cache.lower(backbone, 2, ids, mask, positions)
    assert cache.hits == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache.lower(backbone, 2, ids, mask, positions)
    assert cache.hits == 3 and not any(state.requires_grad for state in cache.entries.values())
