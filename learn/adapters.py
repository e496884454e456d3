"""A version as a LoRA adapter on a full-weight base: the one a round trained, composed with its parent's, written
and read in PEFT's folder format (which vLLM serves with `enable_lora`).

A round trains LoRA on its parent's weights. Where the parent is itself an adapter on a base, the new version is the
base plus both deltas: B1·A1·s1 + B2·A2·s2 = [B1·s1 | B2·s2]·[A1 ; A2], one adapter of rank r1 + r2 whose scaling
is folded into B (PEFT's alpha = r). The composition is exact; what the adapter serves differs from the stored
merged weights (what the gate judged) by the bf16 rounding of each merge along the chain, well below a round's
change (tests/learn/test_adapters.py measures both). The rank grows by one round's with every version in the chain,
so that a store keeps a version as an adapter only up to a rank limit, and a full-weight copy always.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deploy.model_store import ADAPTER_CONFIG, ADAPTER_WEIGHTS

CONFIG, WEIGHTS = ADAPTER_CONFIG, ADAPTER_WEIGHTS
PREFIX = "base_model.model."  # PEFT's prefix of a module's name in a saved adapter


@dataclass(frozen=True)
class Adapter:
    """Per module (its name in the base model, `model.layers.3.self_attn.q_proj`), its (A, B) with the scaling
    folded into B: the module's weight becomes W + B·A. Every module has the same rank."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return next(iter(self.modules.values()))[0].shape[0] if self.modules else 0

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.modules[module]
        return b @ a


def from_peft(model: Any) -> Adapter:
    """The trained adapter of a PEFT model (its `default` adapter), scaling folded in, as fp32 tensors."""
    modules = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().float().cpu()
            b = module.lora_B["default"].weight.detach().float().cpu() * module.scaling["default"]
            modules[name.removeprefix(PREFIX)] = (a.clone(), b.clone())
    return Adapter(modules)


def compose(first: Adapter, then: Adapter) -> Adapter:
    """One adapter whose delta is `first`'s plus `then`'s for every module either touches (a module only one of
    them has gets zero rows and columns for the other's rank)."""
    modules = {}
    for name in sorted(first.modules.keys() | then.modules.keys()):
        a1, b1 = first.modules.get(name) or _zeros(then.modules[name], first.rank)
        a2, b2 = then.modules.get(name) or _zeros(first.modules[name], then.rank)
        modules[name] = (torch.cat([a1, a2], dim=0), torch.cat([b1, b2], dim=1))
    return Adapter(modules)


def _zeros(like: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = like
    return a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)


def save_adapter(adapter: Adapter, folder: Path, base: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """PEFT's folder format: alpha = r (the scaling is in B), the modules' leaf names as targets."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(folder / WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": adapter.rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in adapter.modules}),
        "base_model_name_or_path": base,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(folder: Path) -> Adapter:
    """An adapter `save_adapter` wrote (scaling alpha / r folded into B, as fp32)."""
    config = json.loads((folder / CONFIG).read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / WEIGHTS))
    modules = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[f"{PREFIX}{name}.lora_B.weight"]
            modules[name] = (a.float(), b.float() * scaling)
    return Adapter(modules)
