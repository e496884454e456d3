"""How several learner processes split a batch (learn.distributed.World) and weigh their shares (learn.loop), checked
in one process: a share's loss counts by its units, and a share without units adds nothing, not NaN."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from learn import loop
from learn.distributed import World, agreed, total_of, world
from learn.loop import _shared_step


def test_rows_are_dealt_out_in_turn_and_every_row_has_one_owner() -> None:
    processes = [World(rank, 3) for rank in range(3)]
    assert [p.share(list(range(7))) for p in processes] == [[0, 3, 6], [1, 4], [2, 5]]
    assert all(sum(p.owns(row) for p in processes) == 1 for row in range(7))
    assert World().main and World().alone and not World(1, 2).main


def test_alone_nothing_is_communicated() -> None:
    assert world() == World() and agreed(lambda: {"until": "5-0"}) == {"until": "5-0"} and total_of(3) == 3.0


def _model() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    model = torch.nn.Linear(2, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_share_is_weighed_by_its_units() -> None:
    model, optimizer = _model()
    seen: list[list[int]] = []

    def step(rows: list[int]) -> tuple[Tensor, dict[str, float]]:
        seen.append(rows)
        return model(torch.ones(1, 2)).sum() * 0 + 2.0 * len(rows), {}

    # Rank 1 of 2 takes rows 1 and 3; alone in this process, the batch's units are its own: weight 1.
    loss, _ = _shared_step(
        World(1, 2), [0, 1, 2, 3], step, lambda rows: 5 * len(rows), optimizer, list(model.parameters())
    )
    assert seen == [[1, 3]] and loss == 4.0


def test_a_share_without_units_adds_nothing_rather_than_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _model()
    monkeypatch.setattr(loop, "total_of", lambda number, device="cpu": number + 7.0)  # the other rank has 7 units

    def step(rows: list[int]) -> tuple[Tensor, dict[str, float]]:  # an all-unlabelled share's mean: 0/0
        return model(torch.ones(1, 2)).sum() * float("nan"), {}

    _shared_step(World(0, 2), [0, 1], step, lambda rows: 0, optimizer, list(model.parameters()))
    assert all(p.grad is None or not p.grad.isnan().any() for p in model.parameters())
