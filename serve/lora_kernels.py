"""LoRA products for vLLM's CPU backend, grouped by adapter: registered as a vLLM plugin (entry point group
`vllm.general_plugins`, loaded in each of vLLM's processes), they replace what its CPU LoRA wrapper calls.

vLLM's own CPU ops gather every token's adapter matrices (`weights[indices]`: a tokens x out x rank tensor per
layer and step) and contract them with einsum: with them, SmolLM2 served as an adapter had not finished the
MT-bench workload after five minutes where merged weights took under one (bench/adapter_serving.py). Here the
tokens of each adapter take one matrix product with that adapter's weights, and a linear layer's slices (q, k, v)
share one pair of products. Index -1 means "no adapter" (vLLM's convention): those rows get nothing added, where
vLLM's CPU ops wrap -1 round to the last adapter slot and would add that adapter to a base version's answers
whenever two adapters are loaded.

The ops keep vLLM's signatures (vllm.lora.ops.torch_ops) and its conventions: weights are (slots, [1,] out, in),
padded with zeros to vLLM's max_lora_rank; `sgmv_*` (prefill) give each sequence's index to its tokens. Products
run in fp32 at each adapter's own rank (the padding cut off) and round once into the output's dtype.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

NO_ADAPTER = -1
CACHED = 8192  # trimmed matrices kept (a few per LoRA layer and slot); the cache starts afresh past it


def groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | slice]]:
    """(adapter slot, its rows) for each slot in `indices`; a plain slice where every row has the same adapter
    (the usual case: one version served), so that no rows are copied. Every LoRA layer of a step asks with the
    same indices: the answer is kept while they stay equal (one comparison instead of several operations)."""
    last = _last_groups.get("indices")
    if last is None or last.shape != indices.shape or not torch.equal(last, indices):
        _last_groups.update(indices=indices.clone(), groups=_groups(indices))
    found: list[tuple[int, torch.Tensor | slice]] = _last_groups["groups"]
    return found


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | slice]]:
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [] if first == NO_ADAPTER else [(first, slice(None))]
    slots = [int(slot) for slot in torch.unique(indices).tolist() if slot != NO_ADAPTER]
    return [(slot, (indices == slot).nonzero().squeeze(1)) for slot in slots]


_last_groups: dict[str, Any] = {}
_trimmed: dict[tuple[object, ...], torch.Tensor] = {}
# The adapter id in each of vLLM's slots, as its LoRA wrapper was last told (update_metadata, wrapped by
# `register`); None until then, and then nothing is cached: a slot's weights are known only by its adapter's id.
_slots: list[int | None] | None = None


def note_slots(lora_index_to_id: list[int | None]) -> None:
    """Record which adapter each slot holds; vLLM writes an adapter's weights into its slot before it says so."""
    global _slots
    _slots = list(lora_index_to_id)


def matrix(weights: torch.Tensor, slot: int, trim: int) -> torch.Tensor:
    """Slot `slot` of `weights` ((slots, [1,] out, in)) transposed to (in, out) in fp32, without the zero rows
    (trim=-2: A, padded to vLLM's max_lora_rank) or zero columns (trim=-1: B) that pad an adapter of lower rank:
    an exact product at the adapter's own rank. Kept while the slot holds the same adapter."""
    owner = _slots[slot] if _slots is not None and slot < len(_slots) else None
    key = (weights.data_ptr(), tuple(weights.shape), weights.dtype, slot, trim, owner)
    found = _trimmed.get(key) if owner is not None else None
    if found is None:
        m = weights[slot]
        m = (m.squeeze(0) if m.dim() == 3 else m).to(torch.float32, copy=True)
        used = m.abs().amax(dim=0 if trim == -1 else 1)  # per rank: B's columns, A's rows
        nonzero = used.nonzero()
        rank = int(nonzero[-1]) + 1 if nonzero.numel() else 0
        found = (m[:, :rank] if trim == -1 else m[:rank]).T.contiguous()
        if owner is not None:
            if len(_trimmed) >= CACHED:
                _trimmed.clear()
            _trimmed[key] = found
    return found


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """output[:, :rank] = scaling * inputs @ A.T, each row with its own adapter's A (0 without one)."""
    output = output_tensor[:, : lora_a_weights.shape[-2]]
    output.zero_()
    for slot, rows in groups(lora_indices_tensor):
        a = matrix(lora_a_weights, slot, -2)  # (in, rank)
        if a.shape[1]:
            output[rows, : a.shape[1]] = (inputs[rows].float() @ a).mul_(scaling).to(output.dtype)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """output[:, :out] (+)= inputs @ B.T, each row with its own adapter's B. As vLLM's op: one input row against
    several output rows writes the first output row only, and the shorter of the two widths counts."""
    rows_out = 1 if inputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _expand(
        inputs[:rows_out],
        lora_b_weights[..., :width, :],
        output_tensor[:rows_out, :width],
        lora_indices_tensor[:rows_out],
        add_inputs,
    )


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """output[:, offset:offset + size] (+)= inputs @ B.T, each row with its own adapter's B."""
    output = output_tensor[:, slice_offset : slice_offset + slice_size]
    _expand(inputs, lora_b_weights, output, lora_indices_tensor, add_inputs)


def _expand(
    inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor, add: bool
) -> None:
    if not add:
        output.zero_()
    for slot, rows in groups(indices):
        b = matrix(weights, slot, -1)  # (rank, out)
        if b.shape[0]:
            delta = inputs[rows, : b.shape[0]].float() @ b
            if isinstance(rows, slice):
                output.add_(delta)
            else:
                output[rows] += delta.to(output.dtype)


def per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """Each sequence's adapter index repeated for its tokens (prefill's metadata is per sequence)."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


def add_lora_linear(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    **kwargs: Any,
) -> None:
    """vLLM's PunicaWrapperCPU.add_lora_linear in two products per adapter, whatever the layer's slices:
    y[:, slices] += (x @ [A_1 .. A_n]) @ blockdiag(B_1 .. B_n) * scale. vLLM's runs a shrink and an expand per slice
    (six for a fused q/k/v projection), and on a small model each call's fixed cost is much of the layer's time."""
    if self.is_prefill:
        if self.no_lora:  # vLLM's shortcut: one sequence, no adapter
            return
        _, lengths, per_sequence, *_ = self.prefill_metadata
        indices = per_token(per_sequence, lengths)
    else:
        indices = self.token_lora_indices
    inputs = x.view(-1, x.shape[-1])
    output = y.view(-1, y.shape[-1])[:, : sum(output_slices)]
    for slot, rows in groups(indices):
        a, b = stacked(lora_a_stacked, lora_b_stacked, output_slices, slot, scale)
        if a.shape[1]:
            delta = (inputs[rows].float() @ a) @ b
            if isinstance(rows, slice):
                output.add_(delta)
            else:
                output[rows] += delta.to(output.dtype)


def stacked(
    a_slices: tuple[torch.Tensor, ...],
    b_slices: tuple[torch.Tensor, ...],
    widths: tuple[int, ...],
    slot: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot `slot`'s adapters of a layer's slices as one (in, R) matrix, `scale` folded in, and one block-diagonal
    (R, sum of widths) matrix, each slice at its adapter's own rank; kept while the slot holds the same adapter."""
    owner = _slots[slot] if _slots is not None and slot < len(_slots) else None
    key = (tuple(t.data_ptr() for t in (*a_slices, *b_slices)), widths, slot, scale, owner)
    found = _stacked.get(key) if owner is not None else None
    if found is None:
        pairs = [(matrix(a, slot, -2), matrix(b, slot, -1)) for a, b in zip(a_slices, b_slices, strict=True)]
        ranks = [min(a.shape[1], b.shape[0]) for a, b in pairs]  # past either's rank a term is 0
        a_all = torch.cat([a[:, :r] for (a, _), r in zip(pairs, ranks, strict=True)], dim=1) * scale
        b_all = torch.zeros(sum(ranks), sum(widths))
        row = col = 0
        for (_, b), r, width in zip(pairs, ranks, widths, strict=True):
            b_all[row : row + r, col : col + width] = b[:r, :width]
            row, col = row + r, col + width
        found = (a_all, b_all)
        if owner is not None:
            if len(_stacked) >= CACHED:
                _stacked.clear()
            _stacked[key] = found
    return found


_stacked: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def register() -> None:
    """vLLM's plugin hook: point its CPU LoRA wrapper at these ops (it imported vLLM's by name), and have it say
    which adapter each slot holds. Safe to run more than once, and where vLLM runs on a GPU (its GPU wrapper never
    calls these)."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the CPU wrapper: nothing to replace
        return
    wrapper = punica_cpu.PunicaWrapperCPU
    if getattr(wrapper.update_metadata, "notes_slots", False):
        return
    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    setattr(wrapper, "add_lora_linear", add_lora_linear)  # noqa: B010 (mypy: a method assigned)
    update = wrapper.update_metadata

    def update_metadata(self: Any, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kw: Any) -> None:
        update(self, mapping, lora_index_to_id, *args, **kw)
        note_slots(lora_index_to_id)

    update_metadata.notes_slots = True  # type: ignore[attr-defined]
    setattr(wrapper, "update_metadata", update_metadata)  # noqa: B010 (mypy: a method assigned)
    log.info("vLLM's CPU LoRA products grouped by adapter (serve.lora_kernels)")
