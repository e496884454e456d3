"""The training loop SFT, pre-training and the reward model share: AdamW, warm-up then linear decay, gradient
clipping, a metrics line and a progress tick per step, and checkpoints that resume exactly.

A run's batches are fixed up front from (seed, epochs), so a resumed run skips the steps it already took and meets
the same batches in the same order as an uninterrupted run would. Under torchrun each process takes its share of
every batch and the gradients are summed (learn.distributed), which gives the one-process step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deploy.durable import write_atomic
from learn.distributed import World, sum_gradients, total_of, world
from learn.trainlog import MetricsLog, step_progress

StepFn = Callable[[list[int]], tuple[Tensor, dict[str, float]]]  # batch of item indices -> (loss, figures)
# Item indices -> how many units the step's loss is a mean over (prompts with a ranked pair, labelled tokens): what
# weighs each process's share of a batch when several share it.
UnitsFn = Callable[[list[int]], int]
StepHook = Callable[[int, int], None]  # (steps taken, steps in the run), after each optimiser step


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, quick runs); the schedule still spans the whole run
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end when a checkpoint path is given


@dataclass
class LoopResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per step taken in this process
    resumed_from: int = 0


def schedule(n_items: int, config: LoopConfig) -> list[list[int]]:
    """Every batch of the run, in order: each epoch a fresh shuffle of the items, seeded."""
    rng = random.Random(config.seed)
    batches: list[list[int]] = []
    for _ in range(config.epochs):
        order = list(range(n_items))
        rng.shuffle(order)
        batches += [order[i : i + config.batch_size] for i in range(0, n_items, config.batch_size)]
    return batches


def make_optimizer(
    params: Sequence[torch.nn.Parameter], config: LoopConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        remaining = max(1, total_steps - config.warmup_steps)
        return max(0.0, 1.0 - (step - config.warmup_steps) / remaining)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_loop(
    model: torch.nn.Module,
    n_items: int,
    step_fn: StepFn,
    config: LoopConfig,
    log: MetricsLog,
    description: str,
    checkpoint: Path | None = None,
    show_progress: bool = True,
    on_step: StepHook | None = None,
    units: UnitsFn | None = None,
) -> LoopResult:
    """Train `model` over `n_items` items with `step_fn` computing each batch's loss; resume from `checkpoint`.
    `on_step` sees each step taken (a benchmark measures the model there), with the model back in eval mode.
    `units` is needed where several processes share the batches (learn.distributed)."""
    processes = world()
    if not processes.alone and units is None:
        raise ValueError("a loop shared by several processes needs the units its loss is a mean over")
    batches = schedule(n_items, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, config, len(batches))
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start = load_checkpoint(checkpoint, model, optimizer, scheduler)
    end = len(batches) if config.max_steps is None else min(len(batches), start + config.max_steps)
    result = LoopResult(steps=start, resumed_from=start)
    model.train()
    with step_progress(description, end - start, show_progress) as progress:
        for step in range(start, end):
            if processes.alone:
                loss, figures = step_fn(batches[step])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                shown = float(loss.detach())
            else:
                assert units is not None
                shown, figures = _shared_step(processes, batches[step], step_fn, units, optimizer, params)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            result.losses.append(shown)
            result.steps = step + 1
            lr = scheduler.get_last_lr()[0]
            log.write(step + 1, loss=result.losses[-1], lr=lr, grad_norm=grad_norm, **figures)
            progress.advance(loss=result.losses[-1], **figures)
            every = config.checkpoint_every
            due = step + 1 == end or (every and (step + 1) % every == 0)
            if checkpoint is not None and due and processes.main:
                save_checkpoint(checkpoint, model, optimizer, scheduler, step + 1)
            if on_step is not None:
                model.eval()
                on_step(step + 1, len(batches))
                model.train()
    model.eval()
    return result


def _shared_step(
    processes: World,
    batch: list[int],
    step_fn: StepFn,
    units: UnitsFn,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
) -> tuple[float, dict[str, float]]:
    """This process's share of a batch, its loss weighted by its share of the batch's units, the gradients summed
    over the processes; returns the batch's loss (the same on every process) and this share's figures."""
    mine = processes.share(batch)
    own = units(mine) if mine else 0
    device = params[0].device  # NCCL sums GPU tensors only
    whole = total_of(own, device)
    optimizer.zero_grad(set_to_none=True)
    part, figures = 0.0, dict[str, float]()
    if mine and own:  # a share without units has a loss of 0/0: it adds nothing (its gradient is zeros)
        loss, figures = step_fn(mine)
        (loss * (own / whole)).backward()  # type: ignore[no-untyped-call]
        part = float(loss.detach()) * own
    sum_gradients(params)
    return (total_of(part, device) / whole if whole else 0.0), figures


def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The state entries of the parameters being trained (all weights, or only the LoRA adapters)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def save_atomic(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` whole or not at all, and on disk: a crash while saving leaves the previous file
    whole."""
    write_atomic(path, lambda file: torch.save(state, file))


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> None:
    """Everything needed to go on exactly: trainable weights, optimiser and schedule, step, RNG states."""
    state: dict[str, Any] = {
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    save_atomic(path, state)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    state = torch.load(path, weights_only=True)  # a checkpoint holds tensors and plain values: never run code
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])
