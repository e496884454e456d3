"""LoRA products for vLLM's CPU backend, grouped by adapter: registered as a vLLM plugin (entry point group
`vllm.general_plugins`, loaded in each of vLLM's processes), they replace what its CPU LoRA wrapper calls.

vLLM's own CPU ops gather every token's adapter matrices (`weights[indices]`: a tokens x out x rank tensor per
layer and step) and contract them with einsum: with them, SmolLM2 served as an adapter had not finished the
MT-bench workload after five minutes where merged weights took under one (bench/adapter_serving.py). Here the
tokens of each adapter take one matrix product with that adapter's weights, and a linear layer's slices (q, k, v)
share one pair of products. Index -1 means "no adapter" (vLLM's convention): those rows get nothing added, where
vLLM's CPU ops wrap -1 round to the last adapter slot and add whatever it holds (an adapter loaded there, or one
it held before: a freed slot keeps its weights) to a base version's answers whenever they share a batch with an
adapter's (a canary of an adapter beside its base; a batch of base answers alone skips LoRA altogether).

The ops keep vLLM's signatures (vllm.lora.ops.torch_ops) and its conventions: weights are (slots, [1,] out, in),
padded with zeros to vLLM's max_lora_rank; `sgmv_*` (prefill) give each sequence's index to its tokens. Products
run in fp32 at each adapter's own rank (the padding cut off) and round once into the output's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

NO_ADAPTER = -1


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
# Products' matrices, kept until vLLM writes another adapter into a slot (`adapters_changed`).
_trimmed: dict[tuple[object, ...], torch.Tensor] = {}
_stacked: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def adapters_changed() -> None:
    """Forget every kept matrix: vLLM has written an adapter into a slot (`register` calls this after each of its
    LoRA manager's activations; a direct caller that writes into the weights calls it too)."""
    _trimmed.clear()
    _stacked.clear()
    _last_groups.clear()


def matrix(weights: torch.Tensor, slot: int, trim: int) -> torch.Tensor:
    """Slot `slot` of `weights` ((slots, [1,] out, in)) transposed to (in, out) in fp32, without the zero rows
    (trim=-2: A, padded to vLLM's max_lora_rank) or zero columns (trim=-1: B) that pad an adapter of lower rank:
    an exact product at the adapter's own rank. Kept until `adapters_changed`."""
    key = (weights.data_ptr(), tuple(weights.shape), tuple(weights.stride()), weights.dtype, slot, trim)
    found = _trimmed.get(key)
    if found is None:
        found = _trimmed[key] = _trim(weights, slot, trim)
    return found


def _trim(weights: torch.Tensor, slot: int, trim: int) -> torch.Tensor:
    """`matrix`'s work, not kept (`stacked` keeps its own concatenation, not the pieces)."""
    m = weights[slot]
    m = (m.squeeze(0) if m.dim() == 3 else m).to(torch.float32, copy=True)
    used = m.abs().amax(dim=0 if trim == -1 else 1)  # per rank: B's columns, A's rows
    nonzero = used.nonzero()
    rank = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    return (m[:, :rank] if trim == -1 else m[:rank]).T.contiguous()


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
    """output[:, :out] (+)= inputs @ B.T, each row with its own adapter's B, over the narrower of the two widths.
    As vLLM's op, one input row against several output rows goes to every one of them."""
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    weights, output = lora_b_weights[..., :width, :], output_tensor[:, :width]
    if inputs.shape[0] == 1 and output.shape[0] != 1:
        row = torch.zeros(1, width, dtype=torch.float32)
        _expand(inputs, weights, row, lora_indices_tensor[:1], add=True)
        if add_inputs:
            output.add_(row)
        else:
            output.copy_(row.expand_as(output))
        return
    rows = output.shape[0]
    _expand(inputs[:rows], weights, output, lora_indices_tensor[:rows], add_inputs)


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
            _add(output, rows, inputs[rows, : b.shape[0]].float() @ b)


def _add(output: torch.Tensor, rows: torch.Tensor | slice, delta: torch.Tensor) -> None:
    """output[rows] += delta (fp32), rounded once into the output's dtype, whichever rows."""
    if isinstance(rows, slice):
        output.add_(delta)
    else:
        output[rows] = (output[rows].float() + delta).to(output.dtype)


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
    if not kwargs.get("add_inputs", True):  # vLLM's GPU path asks for the product alone; kept for parity
        output.zero_()
    for slot, rows in groups(indices):
        a, b = stacked(lora_a_stacked, lora_b_stacked, output_slices, slot, scale)
        if a.shape[1]:
            _add(output, rows, (inputs[rows].float() @ a) @ b)


def stacked(
    a_slices: tuple[torch.Tensor, ...],
    b_slices: tuple[torch.Tensor, ...],
    widths: tuple[int, ...],
    slot: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot `slot`'s adapters of a layer's slices as one (in, R) matrix, `scale` folded in, and one block-diagonal
    (R, sum of widths) matrix, each slice at its adapter's own rank; kept until `adapters_changed`."""
    key = (tuple(t.data_ptr() for t in (*a_slices, *b_slices)), widths, slot, scale)
    found = _stacked.get(key)
    if found is None:
        pairs = [(_trim(a, slot, -2), _trim(b, slot, -1)) for a, b in zip(a_slices, b_slices, strict=True)]
        ranks = [min(a.shape[1], b.shape[0]) for a, b in pairs]  # past either's rank a term is 0
        a_all = torch.cat([a[:, :r] for (a, _), r in zip(pairs, ranks, strict=True)], dim=1) * scale
        b_all = torch.zeros(sum(ranks), sum(widths), dtype=torch.float32)
        row = col = 0
        for (_, b), r, width in zip(pairs, ranks, widths, strict=True):
            b_all[row : row + r, col : col + width] = b[:r, :width]
            row, col = row + r, col + width
        found = _stacked[key] = (a_all, b_all)
    return found


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def register() -> None:
    """vLLM's plugin hook: point its CPU LoRA wrapper at these ops (it imported vLLM's by name) and at the fused
    linear product, and have its LoRA manager say when it writes an adapter into a slot. Safe to run more than
    once, and where vLLM runs on a GPU (its GPU wrapper never calls these)."""
    try:
        from vllm.lora import model_manager
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without LoRA on CPU: nothing to replace
        return
    manager = model_manager.LoRAModelManager
    if getattr(manager.activate_adapter, "tells_kernels", False):
        return
    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    setattr(punica_cpu.PunicaWrapperCPU, "add_lora_linear", add_lora_linear)  # noqa: B010 (mypy: a method)
    setattr(manager, "activate_adapter", telling(manager.activate_adapter))  # noqa: B010
    log.info("vLLM's CPU LoRA products grouped by adapter (serve.lora_kernels)")


def telling(activate: Callable[..., bool]) -> Callable[..., bool]:
    """`activate` (LoRAModelManager.activate_adapter), followed by `adapters_changed` when it wrote a slot."""

    def activate_adapter(self: Any, *args: Any, **kwargs: Any) -> bool:
        written = activate(self, *args, **kwargs)
        if written:
            adapters_changed()
        return written

    activate_adapter.tells_kernels = True  # type: ignore[attr-defined]
    return activate_adapter
