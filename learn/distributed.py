"""Several learner processes (launched by `torchrun`): who this process is, its share of each batch, and the sums
that make the shares one batch again.

The rule that keeps N processes equal to one: every process holds the same weights, reads the same data and walks
the same schedule of global batches; each computes the loss of its share of a batch as that share's part of the
global mean (a sum over its units divided by the units of the whole batch), the gradients are summed over the
processes (torch.distributed's all-reduce), and every process then takes the same optimiser step. Rank 0 alone
writes what outlives the round: checkpoints, versions, metrics and status.

Without torchrun (one process) nothing here communicates, and the code paths reduce to the plain ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, versions, metrics and status."""
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.size == 1

    def owns(self, row: int) -> bool:
        """Whether this process computes global row `row` of a batch (rows dealt out in turn)."""
        return row % self.size == self.rank

    def share(self, rows: Sequence[T]) -> list[T]:
        """This process's part of a global batch: every size-th item from its rank."""
        return list(rows[self.rank :: self.size])


def world() -> World:
    """This process's place among the learner's processes (one, outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def join(device: torch.device) -> tuple[World, torch.device]:
    """Under torchrun (WORLD_SIZE > 1), join the process group: NCCL between GPUs (each process on the GPU of its
    LOCAL_RANK), gloo between CPUs. Returns this process's world and the device it computes on."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():  # joined before: the device is the one chosen then
        return world(), torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
    if size <= 1:
        return world(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # A rank that waits longer than this on the others has lost one: it fails, and torchrun restarts the job from
    # the round's last checkpoint. Long enough for what rank 0 does alone while the others wait (writing a version
    # to a network file system).
    timeout = timedelta(minutes=30)
    rank = int(os.environ["RANK"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    store = dist.TCPStore(  # type: ignore[attr-defined]  # exported by torch, not declared
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        size,
        is_master=not agent and rank == 0,
        timeout=timeout,
    )
    # Each attempt of a restarted job under keys of its own: the processes of the attempt before left their
    # addresses in the same store, and a process that read a dead one's failed to connect (seen with gloo).
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=dist.PrefixStore(f"rankloop/attempt-{attempt}", store),  # type: ignore[attr-defined]
        rank=rank,
        world_size=size,
        timeout=timeout,
    )
    return world(), device


def total(value: Tensor) -> Tensor:
    """`value` summed over the processes (in place; the same tensor back)."""
    if world().size > 1:
        dist.all_reduce(value)
    return value


def total_of(number: float, device: torch.device | str = "cpu") -> float:
    """A number summed over the processes."""
    return float(total(torch.tensor([number], dtype=torch.float64, device=device))[0])


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Each trainable parameter's gradient summed over the processes, in one all-reduce of one flat buffer (a
    process whose share held nothing contributes zeros)."""
    if world().size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def same_start(module: torch.nn.Module) -> None:
    """Rank 0's trainable weights to every process (a head initialised at random must start alike everywhere)."""
    if world().size == 1:
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def agreed(read: Callable[[], T]) -> T:
    """`read()` on rank 0 alone, its answer on every process: what each would read of data that grows meanwhile
    (the newest ranking, the learner's next move) must be one answer, or their batches and collectives would
    differ; and the others need not do the reading (or the sampling) at all."""
    if world().size == 1:
        return read()
    box: list[object] = [read() if world().main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def written_by_main(write: Callable[[], object]) -> None:
    """`write()` on rank 0 alone, every process going on once it is done: what the others read next (a version,
    a checkpoint's new place) is then there."""
    if world().main:
        write()
    barrier()
