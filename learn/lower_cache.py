"""The frozen lower layers' hidden states, kept per sequence for as long as the learner runs.

Every version made here keeps the SFT reference's lower layers (learn.layers), and a round passes the same sequences
through them several times: the reward model is evaluated on the held-out rankings each round (mostly the same as
the round before), PPO scores the answers the reward model has just trained on, and the judgement reads the held-out
rankings the reward model was evaluated on. Each sequence's output is kept at the splits the rounds use (PPO's and
the reward model's, `configure`), so that a later pass runs only the layers above the highest split it finds.

An entry is keyed by a fingerprint of the weights below its split (their content, not their Python identity: a
version loaded again from the store finds its entries), the sequence's tokens and first position, the device and
the precision of the products. Padding is not part of the key: a row's causal attention never sees the padding
after it, nor, masked, the padding before it, so its hidden states are the same in any batch (up to the rounding
of kernels that block a batch differently). The least recently used entries go once the cache holds more than its
budget; a round that runs out of GPU memory empties it (learn.daemon.failure).
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learn import layers

Key = tuple[str, tuple[Any, ...], tuple[int, ...], int]  # (weights' fingerprint, precision, tokens, first position)


@dataclass(frozen=True)
class Row:
    """Where a row's real tokens are in its padded batch row, and what they are."""

    start: int
    stop: int
    tokens: tuple[int, ...]
    first_position: int


def row_of(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Row | None:
    """The row's real tokens (one contiguous run, positions counting up by one), or None where they are not: such
    a row is computed, never cached."""
    real = attention_mask.nonzero().flatten().tolist()
    if not real or real[-1] - real[0] + 1 != len(real):
        return None
    start, stop = real[0], real[-1] + 1
    positions = position_ids[start:stop].tolist()
    if positions != list(range(positions[0], positions[0] + len(positions))):
        return None
    return Row(start, stop, tuple(input_ids[start:stop].tolist()), int(positions[0]))


def precision_of(device: torch.device) -> tuple[Any, ...]:
    """The products' precision on `device` (autocast on or off, and to what): it moves the hidden states a little."""
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return (str(device), str(torch.get_autocast_dtype(kind)))
    return (str(device), "off")


class Fingerprints:
    """A content hash of the weights below each split of a backbone (or of a whole model's, learn.kept_logprobs).
    Each tensor's figures (`of_tensor`) are computed once per version of the tensor, and held only while the tensor
    lives: a model loaded later in the same memory is hashed anew."""

    def __init__(self) -> None:
        # By id, with a weak reference that says whether the id is still that tensor's (tensors compare by value,
        # so they cannot be the keys of a WeakKeyDictionary).
        self._sums: dict[int, tuple[weakref.ref[Tensor], tuple[Any, ...], bytes]] = {}

    def of_tensor(self, p: Tensor) -> bytes:
        """The tensor's shape, dtype, sum, sum of magnitudes and a strided sum (which moves where values swap
        places), in float64. Kept until the tensor changes: in place (its version), or by a new storage
        or dtype put under it (`.data =`, `Module.to`), which leave the version as it was."""
        version = (p._version, p.data_ptr(), p.dtype)
        found = self._sums.get(id(p))
        if found is not None and found[0]() is p and found[1] == version:
            return found[2]
        with torch.no_grad():
            flat = p.detach().reshape(-1)
            stats = torch.stack(
                [
                    flat.sum(dtype=torch.float64),
                    flat.abs().sum(dtype=torch.float64),
                    flat[::61].sum(dtype=torch.float64),
                ]
            ).cpu()
        packed = repr((tuple(p.shape), str(p.dtype), stats.tolist())).encode()
        key = id(p)

        def forget(dead: weakref.ref[Tensor]) -> None:  # the tensor is gone: its entry too, unless its id is reused
            if key in self._sums and self._sums[key][0] is dead:
                del self._sums[key]

        self._sums[key] = (weakref.ref(p, forget), version, packed)
        return packed

    def of(self, backbone: Any, split: int) -> str:
        digest = hashlib.sha256(f"{type(backbone).__name__}/{split}".encode())
        for p in layers.lower_parameters(backbone, split):
            digest.update(self.of_tensor(p))
        return digest.hexdigest()


class LowerCache:
    """Hidden states below splits, per sequence, within a byte budget (0: nothing is kept, every pass computes)."""

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.trained_tops: set[int] = set()  # upper layers the rounds train: each gives a split kept
        self.splits: set[int] = set()  # splits asked for, kept too
        self.entries: OrderedDict[Key, Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.fingerprints = Fingerprints()

    def configure(self, max_bytes: int, trained_tops: Iterable[int]) -> None:
        """The budget, and how many upper layers the learner's rounds train (PPO's, the reward model's)."""
        self.max_bytes = max_bytes
        self.trained_tops = {t for t in trained_tops if t > 0}
        self._evict()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def lower(
        self, backbone: Any, split: int, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
    ) -> Tensor:
        """`layers.lower`, from what is kept where it can: (B, L, H); where it computes from what is kept, zeros at
        padded positions (the mask hides them). Callers run without gradients below the split."""
        if self.max_bytes <= 0 or split <= 0 or (torch.is_grad_enabled() and _trains_below(backbone, split)):
            return layers.lower(backbone, split, input_ids, attention_mask, position_ids)
        ids, mask, positions = (t.cpu() for t in (input_ids, attention_mask, position_ids))  # one copy a batch
        rows = [row_of(ids[i], mask[i], positions[i]) for i in range(ids.shape[0])]
        if None in rows:
            return layers.lower(backbone, split, input_ids, attention_mask, position_ids)
        self.splits.add(split)
        stops = self._stops(backbone, split)
        precision = precision_of(input_ids.device)
        prints = [self.fingerprints.of(backbone, s) for s in stops]
        found = [self._highest(prints, precision, row) for row in rows]
        at = [stage for stage, _ in found]
        states = [state for _, state in found]
        for stage, stop in enumerate(stops):
            behind = [i for i, s in enumerate(at) if s < stage]
            if not behind:
                continue
            start = stops[stage - 1] if stage > 0 else 0
            hidden = self._run(backbone, start, stop, behind, states, rows, input_ids, attention_mask, position_ids)
            for n, i in enumerate(behind):
                row = rows[i]
                assert row is not None
                state = hidden[n, row.start : row.stop].clone()
                states[i], at[i] = state, stage
                self._put((prints[stage], precision, row.tokens, row.first_position), state)
        return _padded(states, rows, input_ids.shape[1])

    def _stops(self, backbone: Any, split: int) -> list[int]:
        """The splits up to `split` that are kept, in order, `split` last."""
        count = layers.layer_count(backbone)
        kept = {count - top for top in self.trained_tops} | self.splits
        return sorted({s for s in kept if 0 < s < split} | {split})

    def _highest(self, prints: list[str], precision: tuple[Any, ...], row: Row | None) -> tuple[int, Tensor | None]:
        """(the highest stop kept for the row, its states there), or (-1, None)."""
        assert row is not None
        for stage in range(len(prints) - 1, -1, -1):
            key = (prints[stage], precision, row.tokens, row.first_position)
            state = self.entries.get(key)
            if state is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return stage, state
        self.misses += 1
        return -1, None

    def _run(
        self,
        backbone: Any,
        start: int,
        stop: int,
        behind: list[int],
        states: list[Tensor | None],
        rows: list[Row | None],
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
    ) -> Tensor:
        """Layers [start, stop) for the rows `behind`, from the embeddings (start 0) or from their states."""
        at = torch.tensor(behind, device=input_ids.device)
        ids, mask, positions = input_ids[at], attention_mask[at], position_ids[at]
        if start == 0:
            return layers.lower(backbone, stop, ids, mask, positions)
        below = _padded([states[i] for i in behind], [rows[i] for i in behind], ids.shape[1])
        return layers.middle(backbone, start, stop, below, mask, positions)

    def _put(self, key: Key, state: Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = state
        self.bytes += size
        self._evict()

    def _evict(self) -> None:
        while self.entries and self.bytes > self.max_bytes:
            _, state = self.entries.popitem(last=False)
            self.bytes -= state.numel() * state.element_size()


def _trains_below(backbone: Any, split: int) -> bool:
    return any(p.requires_grad for p in layers.lower_parameters(backbone, split))


def _padded(states: list[Tensor | None], rows: list[Row | None], width: int) -> Tensor:
    """(B, width, H) from each row's (n, H) states at its real positions; zeros elsewhere (the mask hides them)."""
    first = next(s for s in states if s is not None)
    out = torch.zeros((len(states), width, first.shape[-1]), dtype=first.dtype, device=first.device)
    for i, (state, row) in enumerate(zip(states, rows, strict=True)):
        assert state is not None and row is not None
        out[i, row.start : row.stop] = state
    return out


CACHE = LowerCache()  # the process's: the learner configures it from its settings (learn.rounds)


def lower(backbone: Any, split: int, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """(B, L, H) hidden states after layers [0, split), from the process's cache where it holds them."""
    return CACHE.lower(backbone, split, input_ids, attention_mask, position_ids)
