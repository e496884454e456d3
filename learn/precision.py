"""bf16 matrix products for the learner's rounds, an operator's choice (`learn_bf16`): on CPUs with AMX tiles they
are faster (measured on a 2-core AMX machine: a bf16 matmul 3.5x the fp32 one, a reward-model step on SmolLM2-135M
about 2x); on CPUs without AMX eager bf16 is slower than fp32. fp32 stays the default because bf16 is noisier
(reward scores moved by up to 0.18 for a spread of 0.42). A bf16 round is as repeatable as an fp32 one: a killed
and resumed round ends bit-identical to an uninterrupted one (tests/learn/test_ppo_round.py).

Autocast keeps the weights, the optimiser state and the losses in fp32: only the products run in bf16, and the
code that turns model outputs into rewards and log-probabilities already casts them to fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def autocast(enabled: bool) -> AbstractContextManager[object]:
    """bf16 products for a whole round. Without the weight cache: autocast keeps the bf16 copy of each weight until
    the region ends, so a region around training steps would go on computing with the weights of its first step."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)
