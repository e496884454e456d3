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
