"""`rankloop versions|promote|rollback`: the operator's view of policy versions and the decision of which is served."""

from __future__ import annotations

import getpass
import json
import time
from typing import Annotated

import typer
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from deploy.model_store import ModelStore
from deploy.promotion import promote as promote_version
from deploy.promotion import rollback as rollback_version
from deploy.promotion import sync_store
from deploy.redis_clients import sync_redis
from deploy.registry import Registry, RegistryError
from rankloop.console import fail, settings_or_exit

versions_app = typer.Typer(help="Policy versions: list them, show one.", invoke_without_command=True)
console = Console()


def open_registry() -> tuple[Registry, ModelStore]:
    settings = settings_or_exit()
    registry = Registry(sync_redis(settings))
    store = ModelStore(settings.store_dir)
    try:
        sync_store(registry, store)  # versions written by the learner or imported appear here
    except RedisError as exc:
        raise fail(
            f"the registry's Redis at {settings.shown_redis_url} is not reachable ({exc}); "
            "start the stack (`make run`) or set REDIS_URL"
        ) from exc
    return registry, store


def _figures(card: dict[str, object]) -> str:
    evaluation = card.get("eval")
    if isinstance(evaluation, dict):
        return ", ".join(f"{k} {v:.3g}" for k, v in evaluation.items() if isinstance(v, int | float))
    return ""


@versions_app.callback()
def versions(ctx: typer.Context) -> None:
    """List the versions: state, parent, how made, when, eval figures; the current one marked."""
    if ctx.invoked_subcommand is not None:
        return
    registry, _ = open_registry()
    current, epoch = registry.current()
    table = Table(title=f"policy versions (current {current or 'none'}, epoch {epoch})")
    for column in ("version", "state", "parent", "made by", "created", "eval"):
        table.add_column(column)
    for info in registry.versions():
        mark = "[bold green]" if info.version == current else ""
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)) if info.created else ""
        table.add_row(
            f"{mark}{info.version}", info.state, info.parent or "", info.made_by, created, _figures(info.card)
        )
    console.print(table)


@versions_app.command("show")
def show(version: str) -> None:
    """Everything the registry knows of one version, as JSON."""
    registry, _ = open_registry()
    try:
        info = registry.show(version)
    except RegistryError as exc:
        raise fail(exc) from exc
    print(json.dumps(vars(info), indent=2, default=str))


def promote(
    version: str,
    reason: Annotated[str, typer.Option(help="Why; kept in the events stream.")] = "",
) -> None:
    """Make VERSION the one users talk to (servers follow within a second)."""
    registry, store = open_registry()
    try:
        epoch = promote_version(registry, store, version, getpass.getuser(), reason)
    except RegistryError as exc:
        raise fail(exc) from exc
    console.print(f"{version} is current (epoch {epoch})")


def rollback(
    version: Annotated[str | None, typer.Argument(help="Version to go back to (default: the previous one).")] = None,
    reason: Annotated[str, typer.Option(help="Why; kept in the events stream.")] = "",
) -> None:
    """Go back to the previous current version, or to VERSION."""
    registry, store = open_registry()
    try:
        target, epoch = rollback_version(registry, store, getpass.getuser(), reason, version)
    except RegistryError as exc:
        raise fail(exc) from exc
    console.print(f"{target} is current again (epoch {epoch})")
