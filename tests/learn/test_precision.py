"""`learn_bf16`: matrix products in bf16 inside a round, everything else (and everything outside) in fp32."""

import torch

from learn.precision import autocast


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
