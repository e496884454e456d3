"""`rankloop simulate` and `rankloop eval`: simulated users teaching the served model, and the win rate that says
whether they did."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live

from deploy.model_store import ModelStore, StoreError
from deploy.settings import Settings
from lab.preferences import PreferenceError, load_scorer
from learn.data import DataError
from learn.prompts import DEFAULT_PROMPTS as PROMPT_SET
from rankloop.console import fail, settings_or_exit, training_settings_or_exit

console = Console(stderr=True)
DEFAULT_PROMPTS = (PROMPT_SET,)

PreferenceOption = Annotated[
    str, typer.Option(help="concise, enthusiastic, keyword:WORD, or module:function (a (prompt, answer) -> float).")
]
PromptsOption = Annotated[
    list[Path] | None,
    typer.Option("--prompts", help="Prompt files (JSONL); default: rankloop's own prompt set (320 prompts)."),
]


def _prompts(files: list[Path] | None) -> list[list[dict[str, str]]]:
    from lab.simulate import read_prompts

    paths = list(files or DEFAULT_PROMPTS)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"no such prompt file: {', '.join(missing)} (pass --prompts FILE.jsonl)")
    return read_prompts(paths)


def _key(settings: Settings) -> str | None:
    return settings.api_key.get_secret_value() if settings.api_key is not None else None


def simulate(
    preference: PreferenceOption = "concise",
    users: Annotated[int, typer.Option(min=1, help="Concurrent users.")] = 4,
    k: Annotated[int, typer.Option("--k", min=2, max=9, help="Answers per prompt to rank.")] = 4,
    noise: Annotated[float, typer.Option(min=0.0, max=0.5, help="Chance each compared pair is flipped.")] = 0.1,
    rate: Annotated[float, typer.Option(min=0.0, help="Rankings per second, all users together; 0: no limit.")] = 0.0,
    duration: Annotated[float, typer.Option(min=1.0, help="Seconds to run.")] = 600.0,
    rankings: Annotated[int | None, typer.Option(min=1, help="Stop after this many rankings.")] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Answer length limit; default: the server's (RANKLOOP_DEFAULT_MAX_TOKENS)."),
    ] = None,
    prompts: PromptsOption = None,
    url: Annotated[str | None, typer.Option(help="The server (default: this machine's, from the settings).")] = None,
    seed: int = 0,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="With RANKLOOP_AUTH=keys: the key the users send (default: RANKLOOP_API_KEY); its quotas apply."
        ),
    ] = None,
) -> None:
    """Simulated users chat and rank through the public HTTP API by a scripted preference."""
    from lab.simulate import Plan, Tally, split
    from lab.simulate import simulate as run

    settings = settings_or_exit()
    try:
        scorer = load_scorer(preference)
        train, held = split(_prompts(prompts))
    except (PreferenceError, DataError) as exc:
        raise fail(exc) from exc
    base = url or f"http://{settings.host}:{settings.port}"
    key = api_key or _key(settings)
    plan = Plan(base, train, scorer, users, k, noise, rate, duration, rankings, max_tokens, seed=seed, api_key=key)
    console.print(
        f"{users} users ranking by `{preference}` (noise {noise}) at {base} for {duration:.0f} s: "
        f"{len(train)} prompts ({len(held)} held out for evaluation)"
    )

    with Live(console=console, refresh_per_second=2) as live:

        def show(tally: Tally, elapsed: float) -> None:
            error = f", {tally.errors} errors ({tally.last_error})" if tally.errors else ""
            live.update(
                f"{elapsed:5.0f} s  comparisons {tally.comparisons}  rankings {tally.rankings}  "
                f"serving {tally.version}{error}"
            )

        tally = asyncio.run(run(plan, show))
    console.print(
        f"done: {tally.rankings} rankings over {tally.comparisons} comparisons; by version "
        f"{json.dumps(tally.versions)}; {tally.errors} errors"
    )


def evaluate(
    a: Annotated[str, typer.Argument(help="Version to judge (e.g. the current one).")],
    b: Annotated[str, typer.Argument(help="Version to judge it against (e.g. v0001).")] = "v0001",
    preference: PreferenceOption = "concise",
    samples: Annotated[int, typer.Option(min=1, help="Answers per prompt from each version.")] = 4,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Answer length limit (default: the server's default, RANKLOOP_DEFAULT_MAX_TOKENS)."),
    ] = None,
    prompts: PromptsOption = None,
    seed: int = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Win rate of version A over B on held-out prompts under a preference, with a 95% interval."""
    from lab.judge import compare, save
    from lab.simulate import split

    settings = training_settings_or_exit()
    store = ModelStore(settings.store_dir)
    try:
        scorer = load_scorer(preference)
        _, held = split(_prompts(prompts))
        folders = store.path(a), store.path(b)
    except (PreferenceError, DataError, StoreError) as exc:
        raise fail(exc) from exc
    if not held:
        raise fail("no held-out prompts in the prompt files: pass more prompts")
    limit = max_new_tokens or settings.default_max_tokens
    result = compare(*folders, (a, b), preference, scorer, held, samples, limit, seed, console.print)
    path = save(result, settings.data_dir)
    if as_json:
        print(result.to_json())
        return
    rate = result.win_rate
    console.print(
        f"{a} vs {b} under `{preference}`: win rate [bold]{rate.rate:.1%}[/] (95% {rate.low:.1%}-"
        f"{rate.high:.1%}) over {rate.n} pairs: {rate.wins} wins, {rate.ties} ties, {rate.losses} losses"
        f"{' (significant)' if rate.significant() else ''}; mean length {result.length_a:.0f} vs "
        f"{result.length_b:.0f} characters; saved to {path}"
    )


def report(
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default: DATA_DIR/report/index.html).")] = None,
) -> None:
    """An HTML page with plots of the learning so far: rankings, RM accuracy, reward, KL, ptx loss, length,
    win rates, promotions and rollbacks, and sample answers."""
    from lab.report import events_or_none, write_report

    settings = settings_or_exit()
    target = out or settings.data_dir / "report" / "index.html"
    written = write_report(settings, events_or_none(settings.effective_redis_url), target)
    console.print(f"wrote {written} (open it in a browser)")
