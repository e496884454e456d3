"""The `rankloop` command: every process of the stack and the operator's tools."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deploy.auth import ExposedError, check_exposure
from deploy.launcher import CoreBudget, Launcher, core_budget
from deploy.model_store import ModelStore, StoreError
from deploy.redis_server import EmbeddedRedis, RedisDataError, maxmemory_bytes
from deploy.settings import Settings, redact_url
from rankloop.canary_cli import canary_app, leaderboard
from rankloop.console import fail, settings_or_exit
from rankloop.feedback_cli import app as feedback_app
from rankloop.keys_cli import app as keys_app
from rankloop.learn_cli import app as learn_app
from rankloop.loop_cli import evaluate as evaluate_command
from rankloop.loop_cli import report as report_command
from rankloop.loop_cli import simulate as simulate_command
from rankloop.versions_cli import promote as promote_command
from rankloop.versions_cli import rollback as rollback_command
from rankloop.versions_cli import versions_app

app = typer.Typer(help="Train a chat model from its users' rankings.", no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="The model store: import models as policy versions.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(feedback_app, name="feedback")
app.add_typer(learn_app, name="learn")
app.add_typer(versions_app, name="versions")
app.add_typer(keys_app, name="keys")
app.add_typer(canary_app, name="canary")
app.command("leaderboard")(leaderboard)
app.command("promote")(promote_command)
app.command("rollback")(rollback_command)
app.command("simulate")(simulate_command)
app.command("eval")(evaluate_command)
app.command("report")(report_command)
console = Console(stderr=True)


@app.command()
def serve() -> None:
    """Run the HTTP server and the vLLM engine (needs a Redis server: `rankloop redis` or REDIS_URL)."""
    from serve.main import run

    settings = _exposure_checked(settings_or_exit())
    try:
        run(settings)
    except StoreError as exc:
        raise fail(str(exc)) from exc


def _exposure_checked(settings: Settings) -> Settings:
    try:
        check_exposure(settings)
    except ExposedError as exc:
        raise fail(str(exc)) from exc
    return settings


def _start_redis(settings: Settings) -> EmbeddedRedis:
    server = EmbeddedRedis(settings.redis_dir, settings.redis_port, maxmemory=maxmemory_bytes(settings.redis_maxmemory))
    try:
        server.start()
    except RedisDataError as exc:
        raise fail(str(exc)) from exc
    return server


@app.command()
def redis() -> None:
    """Run the embedded Redis server in the foreground until interrupted."""
    settings = settings_or_exit()
    if settings.redis_url:
        raise fail(f"REDIS_URL is set ({redact_url(settings.redis_url)}): that server is used, none is started")
    server = _start_redis(settings)
    console.print(f"redis ready at {server.url} (data in {server.data_dir}); Ctrl-C stops it")
    _wait_for_signal()
    server.stop()


@app.command()
def up() -> None:
    """Start the whole stack here: embedded Redis (unless REDIS_URL), the server, the feedback consumer, the learner."""
    settings = _exposure_checked(settings_or_exit())
    store = ModelStore(settings.store_dir)
    if store.is_empty():
        model_import(source=None, if_empty=True)
    server = None
    if not settings.redis_url:
        server = _start_redis(settings)
        console.print(f"redis ready at {server.url}")
    launcher = Launcher()
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stack on SIGTERM exactly as on Ctrl-C
    try:
        budget = _core_budget(settings)
        launcher.rankloop("serve", "serve", env={**os.environ, **budget.server})
        launcher.rankloop("feedback consumer", "feedback", "consume")
        if settings.learn_enabled:
            launcher.rankloop("learner", "learn", env={**os.environ, **budget.learner})
        url = f"http://{settings.host}:{settings.port}"
        console.print(f"serving on {url} once the engine is ready (chat and rank: {url}/, the console: {url}/console)")
        console.print("Ctrl-C stops the stack")
        ended = launcher.wait_any()
        code = ended.process.returncode
        console.print(f"[red]{ended.name} exited with {code}; stopping the stack[/]")
        raise typer.Exit(code or 1)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        launcher.stop_all()
        if server is not None:
            server.stop()


def _core_budget(settings: Settings) -> CoreBudget:
    from deploy.hardware import has_cuda

    budget = core_budget(settings, sorted(os.sched_getaffinity(0)), has_cuda())
    if budget.server or budget.learner:
        console.print(
            "cores: "
            + "; ".join(
                f"{k.removeprefix('RANKLOOP_').lower()}={v}" for k, v in {**budget.server, **budget.learner}.items()
            )
        )
    return budget


@model_app.command("import")
def model_import(
    source: Annotated[
        Path | None,
        typer.Option("--from", help="A local Hugging Face folder or .gguf file (default: SmolLM2-135M)."),
    ] = None,
    if_empty: Annotated[
        bool, typer.Option("--if-empty", help="Do nothing when the store has a version (safe from replicas at once).")
    ] = False,
) -> None:
    """Convert a model into the next policy version (the first one also becomes the SFT reference)."""
    from deploy.model_import import import_if_empty, import_model

    settings = settings_or_exit()
    store = ModelStore(settings.store_dir)
    try:
        if if_empty:
            import_if_empty(store, source, console)
        else:
            import_model(store, source, console)
    except (StoreError, OSError, ValueError) as exc:
        raise fail(str(exc)) from exc


@model_app.command("list")
def model_list() -> None:
    """List the versions in the model store."""
    settings = settings_or_exit()
    store = ModelStore(settings.store_dir)
    current, reference = store.current(), store.reference()
    for version in store.versions():
        card = store.card(version)
        marks = [m for m, on in (("current", version == current), ("reference", version == reference)) if on]
        print(f"{version}\t{card.made_by}\t{','.join(marks)}")


@app.command("settings")
def show_settings() -> None:
    """Print the settings in force (after environment variables and the config file)."""
    settings = settings_or_exit()
    for name, value in settings.model_dump().items():
        print(f"{name} = {value!r}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_for_signal() -> None:
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)


def main() -> None:
    app(prog_name="rankloop")
