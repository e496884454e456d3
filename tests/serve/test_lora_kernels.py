"""serve.lora_kernels: LoRA products grouped by adapter give vLLM's CPU ops' results (where those are right), add
nothing to rows without an adapter (index -1), and are what vLLM's CPU wrapper calls once the plugin is loaded."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

from serve import lora_kernels

vllm_ops = pytest.importorskip("vllm.lora.ops.torch_ops")


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """Each test starts with nothing kept (the ops keep matrices between calls, as between a step's layers)."""
    lora_kernels.adapters_changed()
    yield
    lora_kernels.adapters_changed()


def test_shrink_by_hand() -> None:
    # Two adapter slots of rank 1 on 2 inputs: A0 = [1, 2], A1 = [3, -1]; rows use slots 1, -1 (none), 0.
    a = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]])
    x = torch.tensor([[1.0, 1.0], [5.0, 5.0], [2.0, 0.5]])
    out = torch.full((3, 2), 7.0)  # column 1 lies past the rank: untouched
    lora_kernels.bgmv_shrink(x, a, out, torch.tensor([1, -1, 0]), scaling=0.5)
    # row 0: 0.5 * (3*1 - 1*1) = 1; row 1: no adapter, 0; row 2: 0.5 * (1*2 + 2*0.5) = 1.5
    assert out.tolist() == [[1.0, 7.0], [0.0, 7.0], [1.5, 7.0]]


def test_expand_slice_by_hand() -> None:
    # Rank 1 into output columns 1..2: B0 = [[1], [2]], B1 = [[-1], [4]]; rows use slots 0, 1, -1.
    b = torch.tensor([[[1.0], [2.0]], [[-1.0], [4.0]]])
    x = torch.tensor([[2.0], [3.0], [9.0]])
    out = torch.ones(3, 4)
    lora_kernels.bgmv_expand_slice(x, b, out, torch.tensor([0, 1, -1]), slice_offset=1, slice_size=2)
    assert out.tolist() == [[1.0, 3.0, 5.0, 1.0], [1.0, -2.0, 13.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    lora_kernels.bgmv_expand_slice(x, b, out, torch.tensor([0, 1, -1]), 1, 2, add_inputs=False)
    assert out.tolist() == [[1.0, 2.0, 4.0, 1.0], [1.0, -3.0, 12.0, 1.0], [1.0, 0.0, 0.0, 1.0]]


def weights(slots: int, rows: int, cols: int, four_d: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(slots, rows, cols, dtype=dtype)
    return w.unsqueeze(1) if four_d else w


@pytest.mark.parametrize("four_d", [False, True])
@pytest.mark.parametrize("indices", [[0, 0, 0, 0, 0], [1, 0, 1, 1, 0], [2, 2, 0, 1, 2]])
def test_as_vllms_ops_wherever_every_row_has_an_adapter(indices: list[int], four_d: bool) -> None:
    torch.manual_seed(0)
    index = torch.tensor(indices)
    x = torch.randn(len(indices), 12)
    a, b = weights(3, 4, 12, four_d), weights(3, 10, 4, four_d)
    shrunk, expected = torch.zeros(len(indices), 4), torch.zeros(len(indices), 4)
    lora_kernels.bgmv_shrink(x, a, shrunk, index, 0.5)
    vllm_ops.bgmv_shrink(x, a, expected, index, 0.5)
    torch.testing.assert_close(shrunk, expected)
    start = torch.randn(len(indices), 16)
    for add in (True, False):
        ours, theirs = start.clone(), start.clone()
        lora_kernels.bgmv_expand_slice(shrunk, b, ours, index, 3, 10, add)
        vllm_ops.bgmv_expand_slice(shrunk, b, theirs, index, 3, 10, add)
        torch.testing.assert_close(ours, theirs)
        ours, theirs = start.clone(), start.clone()
        lora_kernels.bgmv_expand(shrunk, b, ours, index, add)
        vllm_ops.bgmv_expand(shrunk, b, theirs, index, add)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("index", [[0], [0, 1]])  # one adapter (the whole batch) and two (rows gathered)
def test_bf16_outputs_take_the_fp32_sum_rounded_once(index: list[int]) -> None:
    # 1 + (1 + 2^-9) * 2^-8 = 1 + 2^-8 + 2^-17: just past half a bf16 step (2^-7) above 1, so it rounds up to
    # 1 + 2^-7. Rounding the product to bf16 first (2^-8) would leave an exact tie, which rounds to 1.
    y = torch.full((len(index), 1), 1.0 + 2.0**-9)
    b = torch.full((2, 1, 1, 1), 2.0**-8, dtype=torch.bfloat16)
    out = torch.ones(len(index), 1, dtype=torch.bfloat16)
    lora_kernels.bgmv_expand(y, b, out, torch.tensor(index), add_inputs=True)
    assert out.float().flatten().tolist() == [1.0 + 2.0**-7] * len(index)


def test_an_adapter_of_lower_rank_than_the_slots_is_multiplied_at_its_own() -> None:
    # Slot 0 holds a rank-2 adapter padded with zeros to rank 4 (as vLLM pads to max_lora_rank): the same result.
    # A rank-3 adapter written into the slot is seen once the ops are told (vLLM's manager tells them).
    torch.manual_seed(3)
    a = torch.zeros(2, 1, 4, 6)
    a[0, 0, :2] = torch.randn(2, 6)
    x = torch.randn(3, 6)
    out = torch.full((3, 4), 9.0)
    lora_kernels.bgmv_shrink(x, a, out, torch.tensor([0, 0, 0]), 2.0)
    torch.testing.assert_close(out, 2.0 * x @ a[0, 0].T)
    assert out[:, 2:].abs().sum() == 0
    a[0, 0, 2] = 1.0
    lora_kernels.bgmv_shrink(x, a, out, torch.tensor([0, 0, 0]), 2.0)
    assert out[:, 2].abs().sum() == 0  # kept: nobody said the slot changed
    lora_kernels.adapters_changed()
    lora_kernels.bgmv_shrink(x, a, out, torch.tensor([0, 0, 0]), 2.0)
    torch.testing.assert_close(out, 2.0 * x @ a[0, 0].T)
    assert out[:, 2].abs().sum() > 0 and out[:, 3].abs().sum() == 0


def test_one_input_row_goes_to_every_output_row_and_a_wider_b_is_cut() -> None:
    # As vLLM's bgmv_expand: a single input row against 3 output rows; B (3 wide) into an output 2 wide.
    b = torch.tensor([[[1.0], [2.0], [3.0]]])
    for add, expected in ((True, [[3.0, 5.0]] * 3), (False, [[2.0, 4.0]] * 3)):
        ours, theirs = torch.ones(3, 2), torch.ones(3, 2)
        lora_kernels.bgmv_expand(torch.tensor([[2.0]]), b, ours, torch.tensor([0]), add)
        vllm_ops.bgmv_expand(torch.tensor([[2.0]]), b, theirs, torch.tensor([0]), add)
        assert ours.tolist() == theirs.tolist() == expected


def test_prefill_gives_each_sequence_its_adapter() -> None:
    # Sequences of 2, 3 and 1 tokens on slots 1, -1, 0: as the per-token call with [1, 1, -1, -1, -1, 0].
    torch.manual_seed(1)
    x, a = torch.randn(6, 8), torch.randn(2, 3, 8)
    lengths, per_sequence = torch.tensor([2, 3, 1]), torch.tensor([1, -1, 0])
    ours, per_token = torch.zeros(6, 3), torch.zeros(6, 3)
    lora_kernels.sgmv_shrink(x, a, ours, torch.tensor([0, 2, 5]), lengths, per_sequence, 3, 3, 6, 1.0)
    lora_kernels.bgmv_shrink(x, a, per_token, torch.tensor([1, 1, -1, -1, -1, 0]), 1.0)
    torch.testing.assert_close(ours, per_token)
    assert ours[2:5].abs().sum() == 0  # the sequence without an adapter
    torch.testing.assert_close(ours[:2], x[:2] @ a[1].T)


def test_vllms_cpu_ops_add_the_last_slots_adapter_to_rows_without_one() -> None:
    # Why these ops exist beside speed: index -1 wraps round to the last slot in vLLM's CPU ops.
    a = torch.tensor([[[1.0]], [[2.0]]])
    x = torch.tensor([[3.0]])
    theirs, ours = torch.zeros(1, 1), torch.zeros(1, 1)
    vllm_ops.bgmv_shrink(x, a, theirs, torch.tensor([-1]), 1.0)
    lora_kernels.bgmv_shrink(x, a, ours, torch.tensor([-1]), 1.0)
    assert (theirs.item(), ours.item()) == (6.0, 0.0)


def test_the_plugin_is_registered_and_replaces_the_cpu_wrappers_ops() -> None:
    from vllm.lora import model_manager
    from vllm.lora.punica_wrapper import punica_cpu

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("rankloop_lora_kernels") == "serve.lora_kernels:register"
    original = {name: getattr(punica_cpu, name) for name in lora_kernels.OPS}
    manager, wrapper = model_manager.LoRAModelManager, punica_cpu.PunicaWrapperCPU
    activate, linear = manager.activate_adapter, wrapper.add_lora_linear
    try:
        lora_kernels.register()
        wrapped = manager.activate_adapter
        lora_kernels.register()  # vLLM may load a plugin more than once: wrapped once
        assert manager.activate_adapter is wrapped and getattr(wrapped, "tells_kernels", False)
        assert all(getattr(punica_cpu, name) is getattr(lora_kernels, name) for name in lora_kernels.OPS)
        assert wrapper.add_lora_linear is lora_kernels.add_lora_linear
    finally:
        for name, op in original.items():
            setattr(punica_cpu, name, op)
        setattr(manager, "activate_adapter", activate)  # noqa: B010
        setattr(wrapper, "add_lora_linear", linear)  # noqa: B010


def test_an_activation_that_writes_a_slot_forgets_the_kept_matrices() -> None:
    a = torch.tensor([[[1.0]]])
    x, out, index = torch.tensor([[1.0]]), torch.zeros(1, 1), torch.tensor([0])
    lora_kernels.bgmv_shrink(x, a, out, index, 1.0)
    outcomes = iter([False, True])  # already active (nothing written), then written into a slot
    activate = lora_kernels.telling(lambda manager, lora_id: next(outcomes))
    a[0, 0, 0] = 5.0
    assert activate(None, 7) is False
    lora_kernels.bgmv_shrink(x, a, out, index, 1.0)
    assert out.item() == 1.0
    assert activate(None, 8) is True
    lora_kernels.bgmv_shrink(x, a, out, index, 1.0)
    assert out.item() == 5.0


def linear_layer(seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A q/k/v-like layer of three slices (widths 6, 2, 2) on 8 inputs, two adapter slots padded to rank 4; slot
    0 holds rank-2 adapters (zeros past it), slot 1 rank-4."""
    torch.manual_seed(seed)
    a = tuple(torch.randn(2, 1, 4, 8) for _ in range(3))
    b = tuple(torch.randn(2, 1, width, 4) for width in (6, 2, 2))
    for t in a:
        t[0, 0, 2:] = 0
    for t in b:
        t[0, 0, :, 2:] = 0
    return torch.randn(5, 8), a, b


def by_hand(
    x: torch.Tensor, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], slots: list[int]
) -> torch.Tensor:
    rows = []
    for token, slot in zip(x, slots, strict=True):
        if slot < 0:
            rows.append(torch.zeros(10))
        else:
            rows.append(torch.cat([0.5 * (token @ ai[slot, 0].T) @ bi[slot, 0].T for ai, bi in zip(a, b, strict=True)]))
    return torch.stack(rows)


def test_a_layers_slices_share_one_pair_of_products() -> None:
    x, a, b = linear_layer(4)
    slots = [1, 0, -1, 1, 0]
    wrapper = SimpleNamespace(is_prefill=False, token_lora_indices=torch.tensor(slots))
    y = torch.ones(5, 12)  # two columns past the layer's slices: untouched
    lora_kernels.add_lora_linear(wrapper, y, x, a, b, 0.5, (6, 2, 2))
    torch.testing.assert_close(y[:, :10], 1.0 + by_hand(x, a, b, slots))
    assert (y[:, 10:] == 1.0).all()


def test_prefill_slices_take_each_sequences_adapter() -> None:
    x, a, b = linear_layer(5)
    lengths, per_sequence = torch.tensor([3, 2]), torch.tensor([-1, 0])
    wrapper = SimpleNamespace(
        is_prefill=True, no_lora=False, prefill_metadata=(torch.tensor([0, 3]), lengths, per_sequence, 2, 3, 5)
    )
    y = torch.zeros(5, 10)
    lora_kernels.add_lora_linear(wrapper, y, x, a, b, 0.5, (6, 2, 2))
    torch.testing.assert_close(y, by_hand(x, a, b, [-1, -1, -1, 0, 0]))
