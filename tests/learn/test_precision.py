"""`learn_bf16`: matrix products in bf16 inside a round, everything else (and everything outside) in fp32."""

from pathlib import Path

import pytest
import torch

from learn.precision import autocast, bf16_pays_off


def test_bf16_applies_to_products_only_and_only_when_chosen() -> None:
    layer, x = torch.nn.Linear(4, 3), torch.ones(2, 4)
    with autocast(True):
        product = layer(x)
        assert product.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32  # the weights (and their optimiser) stay fp32
    with autocast(False):
        assert layer(x).dtype == torch.float32
    assert layer(x).dtype == torch.float32


def test_training_inside_one_bf16_region_sees_its_own_updates() -> None:
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 1), torch.ones(8, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)  # each step: output x 0.9
    with autocast(True):  # a whole round: several optimiser steps in one region
        outputs = []
        for _ in range(3):
            out = layer(x).float()
            outputs.append(float(out.detach().mean()))
            out.pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    # each step moves the output towards 0; a cached bf16 weight would repeat the first output
    assert abs(outputs[2]) < abs(outputs[1]) < abs(outputs[0])


@pytest.mark.parametrize(
    ("flags", "pays"),
    [
        ("fpu sse avx2 avx512f avx512_vnni", False),  # AVX-512 without bf16: fp32 is faster
        ("fpu avx512f avx512_bf16 avx512_vnni", True),  # AVX512-BF16 (AMD Zen 4, Intel Cooper Lake)
        ("fpu avx512_bf16 amx_bf16 amx_tile", True),  # AMX tiles
        ("fpu avx2 amx_tile", False),  # tiles without their bf16 instructions
    ],
)
def test_bf16_is_the_cpus_default_where_it_has_bf16_instructions(tmp_path: Path, flags: str, pays: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: avx512_bf16 in a name is no flag\nflags\t\t: {flags}\n\n")
    assert bf16_pays_off("cpu", cpuinfo) is pays
    assert bf16_pays_off("cpu", tmp_path / "missing") is False  # no cpuinfo (not Linux): fp32
