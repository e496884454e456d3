"""`rankloop feedback …`: move events into the dataset, look at the pipeline, export the data."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deploy.redis_clients import sync_redis
from deploy.settings import Settings
from feedback.consumer import FeedbackConsumer, default_consumer_name
from feedback.dataset import Dataset
from feedback.export import Format, preference_rows, sft_row, write_rows
from feedback.status import health
from rankloop.console import settings_or_exit

app = typer.Typer(help="The feedback pipeline: rankings and demonstrations.", no_args_is_help=True)
console = Console(stderr=True)


def _consumer(settings: Settings) -> tuple[FeedbackConsumer, Dataset]:
    dataset = Dataset(settings.dataset_path)
    redis = sync_redis(settings)
    name = settings.feedback_consumer or default_consumer_name(settings.dataset_path)
    consumer = FeedbackConsumer(
        redis, dataset, name, batch=settings.feedback_batch, claim_idle_ms=settings.feedback_claim_idle_ms
    )
    return consumer, dataset


@app.command()
def consume(once: Annotated[bool, typer.Option("--once", help="Store what is there now, then exit.")] = False) -> None:
    """Move accepted feedback from Redis into the dataset (the learner does this itself when it runs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit()
    consumer, dataset = _consumer(settings)
    if once:
        handled = consumer.drain()
        console.print(f"{handled} events handled, {consumer.stored} new in {settings.dataset_path}")
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"consumer {consumer.name} writing to {settings.dataset_path}; Ctrl-C stops")
    consumer.run(stop, on_batch=lambda n: console.print(f"{n} events stored, {dataset.count()} in the dataset"))


@app.command()
def stats(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Counts in the dataset by kind; the stream's length against its bound, pending entries and lag; Redis's
    memory against its limit."""
    settings = settings_or_exit()
    client = sync_redis(settings)
    figures = health(client, settings.dataset_path, settings.feedback_max_backlog)
    counts, stream = figures["dataset"], figures["stream"]
    bound, compared, rejected = stream["max_backlog"], figures["comparisons"], figures["rejected"]
    used, limit = figures["redis_memory"]["used_bytes"], figures["redis_memory"]["max_bytes"]
    if as_json:
        print(json.dumps(figures))
        return
    print(f"dataset   {settings.dataset_path}")
    for kind, count in counts.items():
        print(f"  {kind + 's':<16}{count}")
    print(f"  {'comparisons':<16}{compared} (each stored once, however many rankings name it)")
    if rejected:
        print(f"  {'rejected':<16}{rejected} (entries that broke the event contract; see the log)")
    print("stream")
    share = f" of at most {bound} ({stream['length'] / bound:.0%})" if bound else " (no bound)"
    print(f"  {'length':<16}{stream['length']}{share}\n  {'pending':<16}{stream['pending']}")
    print(f"  {'lag':<16}{stream['lag']}\n  {'consumers':<16}{stream['consumers']}")
    print("redis")
    print(f"  {'memory':<16}{used / 1024**2:.1f} MiB" + (f" of {limit / 1024**2:.0f} MiB" if limit else " (no limit)"))
    for warning in figures["warnings"]:
        print(f"warning: {warning}")


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="File to write.")],
    kind: Annotated[str, typer.Option(help="`rankings` (preference pairs) or `demonstrations` (SFT).")] = "rankings",
    fmt: Annotated[str, typer.Option("--format", help="`jsonl` or `parquet`.")] = "jsonl",
) -> None:
    """Write rankings as (prompt, chosen, rejected, rank_group) pairs, or demonstrations as SFT messages."""
    if kind not in ("rankings", "demonstrations"):
        raise typer.BadParameter("use `rankings` or `demonstrations`", param_hint="--kind")
    if fmt not in ("jsonl", "parquet"):
        raise typer.BadParameter("use `jsonl` or `parquet`", param_hint="--format")
    dataset = Dataset(settings_or_exit().dataset_path)
    if kind == "rankings":
        rows = (row for event_id, event in dataset.rankings() for row in preference_rows(event_id, event))
    else:
        rows = (sft_row(event_id, event) for event_id, event in dataset.demonstrations())
    fmt_: Format = "jsonl" if fmt == "jsonl" else "parquet"
    count = write_rows(rows, out, fmt_)
    console.print(f"{count} rows written to {out}")
