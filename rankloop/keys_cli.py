"""`rankloop keys create|list|revoke`: the API keys of people and programs (RANKLOOP_AUTH=keys)."""

from __future__ import annotations

import datetime
from typing import Annotated

import typer
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from deploy.keys import KeyError_, KeyStore, Role
from deploy.redis_clients import sync_redis
from rankloop.console import fail, settings_or_exit

app = typer.Typer(help="API keys: who may chat, rank and operate (RANKLOOP_AUTH=keys).", no_args_is_help=True)
console = Console()
notes = Console(stderr=True)  # the key alone goes to stdout: `KEY=$(rankloop keys create NAME)` works


def _store() -> KeyStore:
    settings = settings_or_exit()
    return KeyStore(sync_redis(settings))


def _when(stamp: float | None) -> str:
    return "" if stamp is None else datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Who holds the key: a person's or a program's name.")],
    role: Annotated[
        Role, typer.Option(help="user: chat, rank its own answers; rater: rank any; admin: also /admin/.")
    ] = "user",
) -> None:
    """Make a key and print it once: it is stored only as a hash."""
    try:
        key = _store().create(name, role)
    except KeyError_ as exc:
        raise fail(str(exc)) from exc
    except RedisError as exc:
        raise fail(f"Redis is not reachable ({exc}): start the stack (`make run`) or set REDIS_URL") from exc
    notes.print(f"key of [bold]{name}[/] ({role}); it is not shown again:")
    print(key)


@app.command("list")
def list_keys() -> None:
    """Every key made: name, role, when made and revoked, its first characters."""
    try:
        records = _store().records()
    except RedisError as exc:
        raise fail(f"Redis is not reachable ({exc})") from exc
    table = Table("name", "role", "starts", "created", "revoked")
    for record in records:
        table.add_row(record.name, record.role, record.hint + "…", _when(record.created), _when(record.revoked))
    console.print(table)


@app.command()
def revoke(name: Annotated[str, typer.Argument(help="The name whose keys stop working now.")]) -> None:
    """Revoke a name's keys: the next request with one gets a 401."""
    try:
        count = _store().revoke(name)
    except KeyError_ as exc:
        raise fail(str(exc)) from exc
    except RedisError as exc:
        raise fail(f"Redis is not reachable ({exc})") from exc
    console.print(f"revoked {count} key{'s' if count > 1 else ''} of {name}")
