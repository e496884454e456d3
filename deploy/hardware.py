"""What the machine has, for the choices that depend on it (the launcher's core budget, the engine's device)."""

from __future__ import annotations


def has_cuda() -> bool:
    import torch  # here, not at the top: the CLI asks before anything else needs torch

    return bool(torch.cuda.is_available())
