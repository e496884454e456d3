"""`rankloop canary start|status|stop` and `rankloop leaderboard`: let users judge a candidate version beside the
current one, and read what their rankings say."""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deploy.canary import NO_ADAPTERS, Canaries
from deploy.registry import RegistryError
from feedback.standings import Standings, standings
from rankloop.console import fail, settings_or_exit
from rankloop.versions_cli import open_registry

canary_app = typer.Typer(help="A candidate version judged by users beside the current one.")
console = Console()


@canary_app.command("start")
def start(
    version: str,
    share: Annotated[float, typer.Option(help="Share of comparisons that mix the two versions (0-1].")] = 0.25,
    split: Annotated[int, typer.Option(min=1, help="Answers of a mixed comparison the candidate writes.")] = 2,
    reason: Annotated[str, typer.Option(help="Why; kept in the events stream.")] = "",
) -> None:
    """Put VERSION's answers beside the current version's in a share of comparisons."""
    if not settings_or_exit().adapters_served:
        raise fail(NO_ADAPTERS)
    registry, store = open_registry()
    try:
        canary = Canaries(registry.redis).start(store, version, share, split, getpass.getuser(), reason)
    except RegistryError as exc:
        raise fail(exc) from exc
    console.print(
        f"canary {canary.version} against {canary.current}: {canary.share:.0%} of comparisons, "
        f"{canary.split} answer(s) each"
    )


@canary_app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The running canary and its win rate over the current version so far."""
    registry, _ = open_registry()
    canary = Canaries(registry.redis).running()
    board = standings(settings_or_exit().dataset_path, canary.current, canary.started) if canary else None
    if as_json:
        print(json.dumps({"canary": asdict(canary) if canary else None, "standings": _json(board)}, indent=2))
        return
    if canary is None:
        console.print("no canary is running")
        return
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(canary.started))
    console.print(
        f"canary {canary.version} against {canary.current} since {since} (by {canary.who}): "
        f"{canary.share:.0%} of comparisons, {canary.split} answer(s) each"
    )
    _print(board)


@canary_app.command("stop")
def stop(
    reject: Annotated[
        bool, typer.Option("--reject", help="Mark the candidate rejected: no promotion takes it.")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why; kept in the events stream.")] = "",
) -> None:
    """End the running canary; comparisons go back to the current version alone."""
    registry, _ = open_registry()
    try:
        version = Canaries(registry.redis).stop(getpass.getuser(), reason, rejected=reject)
    except RegistryError as exc:
        raise fail(exc) from exc
    console.print(f"canary {version} stopped" + (" and rejected" if reject else ""))


def leaderboard(
    since: Annotated[
        float | None, typer.Option(help="Only rankings accepted after this unix time (default: all).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every version compared in mixed comparisons: Bradley-Terry strength, win rate over the current version."""
    registry, _ = open_registry()
    current, _ = registry.current()
    board = standings(settings_or_exit().dataset_path, current, since)
    if as_json:
        print(json.dumps(_json(board), indent=2))
        return
    _print(board)


def _json(board: Standings | None) -> dict[str, object] | None:
    return asdict(board) if board is not None else None


def _print(board: Standings | None) -> None:
    if board is None or not board.strengths:
        console.print("no ranking of a mixed comparison yet")
        return
    rates = {h.candidate: h for h in board.against_current}
    table = Table(title=f"{board.rankings} rankings of mixed comparisons, {board.pairs} pairs")
    for column in ("version", "strength", f"win rate over {board.current} (95%)", "pairs"):
        table.add_column(column)
    for version, strength in board.strengths.items():
        h = rates.get(version)
        rate = f"{h.rate:.1%} ({h.low:.1%}-{h.high:.1%})" if h else ("current" if version == board.current else "")
        table.add_row(version, f"{strength:+.2f}", rate, str(h.pairs) if h else "")
    console.print(table)
