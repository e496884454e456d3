"""bf16 matrix products for the learner's rounds (`learn_bf16`): on CPUs with bf16 instructions they are faster,
both with AMX tiles (measured on a 2-core AMX machine: a bf16 matmul 3.5x the fp32 one, a reward-model step on
SmolLM2-135M about 2x) and with AVX512-BF16 alone (an AMD EPYC with one thread: a 576x1536 matmul 2.5x, SmolLM2's
whole forward over 8 answers of 300 tokens 2.0x, a forward and backward 1.7x), and on GPUs with bf16 (tensor
cores); on CPUs with neither, eager bf16 is slower than fp32. Unset, the setting follows the learner's device
(`bf16_pays_off`); bf16 is noisier (reward scores moved by up to 0.18 for a spread of 0.42). A bf16 round is as
repeatable as an fp32 one: a killed and resumed round ends bit-identical to an uninterrupted one
(tests/learn/test_ppo_round.py).

Autocast keeps the weights, the optimiser state and the losses in fp32: only the products run in bf16, and the
code that turns model outputs into rewards and log-probabilities already casts them to fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch

# Linux's names (in /proc/cpuinfo) of the instructions that make bf16 products faster than fp32 ones.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def bf16_pays_off(device: torch.device | str = "cpu", cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """On `device`: a GPU with bf16, or a CPU with AMX tiles or AVX512-BF16."""
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    return bool(flags & BF16_CPU_FLAGS)


def use_bf16(setting: bool | None, device: torch.device | str = "cpu") -> bool:
    """The operator's `learn_bf16`, or where unset whether bf16 products pay off on the learner's device."""
    return bf16_pays_off(device) if setting is None else setting


def autocast(enabled: bool, device: torch.device | str = "cpu") -> AbstractContextManager[object]:
    """bf16 products for a whole round on `device`. Without the weight cache: autocast keeps the bf16 copy of each
    weight until the region ends, so a region around training steps would go on computing with the weights of its
    first step."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)
