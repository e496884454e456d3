"""Where the learner computes: `RANKLOOP_LEARN_DEVICE` made a torch device, checked against the machine.

Every stage follows the same rule: its models are loaded onto this device, and tensors follow the model (a batch
is built on the CPU, where its token lists are, and moved once, at the boundary: `Packed.to`, the ptx batch,
generation's inputs). What comes back to the host inside an iteration is a figure or a shape (a float for the
metrics, a batch's width), never a tensor that then goes back.
"""

from __future__ import annotations

from typing import Any

import torch


class DeviceError(ValueError):
    """A learner device this machine does not have, phrased for the operator."""


def learn_device(setting: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU where there is one, else the CPU; `cpu`, `cuda`, `cuda:N` as named, once the
    machine is known to have it (a round that would fail at its first tensor fails here, saying why)."""
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DeviceError(
            f"RANKLOOP_LEARN_DEVICE={setting}: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}); "
            "use auto or cpu"
        )
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"RANKLOOP_LEARN_DEVICE={setting}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def cap_memory(device: torch.device, fraction: float | None) -> bool:
    """Hold this process to `fraction` of a GPU's memory (the rest is the serving engine's); True where a cap was
    set. Past it PyTorch raises its out-of-memory error, which fails the round and not the server."""
    if device.type != "cuda" or fraction is None:
        return False
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return True


def device_of(model: Any) -> torch.device:
    """The device of a model's weights (an AdapterOff's too): where its inputs must be."""
    parameter: torch.nn.Parameter = next(iter(model.parameters()))
    return parameter.device


def out_of_memory(exc: BaseException) -> bool:
    """A GPU that ran out of memory: the round fails with a message that says so, the server goes on serving."""
    return isinstance(exc, torch.cuda.OutOfMemoryError)
