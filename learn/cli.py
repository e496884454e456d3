"""`rankloop learn …`: the training stages, each writing a new version to the model store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deploy.model_store import ModelStore, StoreError
from deploy.settings import Settings
from learn.data import DataError, Demonstration, demonstrations_from_rows, read_jsonl, read_texts

app = typer.Typer(help="Train: SFT on demonstrations, the reward model on rankings.", no_args_is_help=True)
console = Console(stderr=True)

FEEDBACK = "feedback"


def _settings() -> Settings:
    from rankloop.cli import settings_or_exit

    settings = settings_or_exit()
    import torch

    torch.set_num_threads(settings.learn_threads or torch.get_num_threads())
    return settings


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/] {message}")
    return typer.Exit(1)


def load_demonstrations(source: str, settings: Settings) -> list[Demonstration]:
    """`feedback` (the dataset's demonstrations) or a JSONL file in any shape learn.data reads."""
    if source == FEEDBACK:
        from feedback.dataset import Dataset

        with Dataset(settings.dataset_path) as dataset:
            rows = [event.data for event in dataset.events("demonstration")]
        return list(demonstrations_from_rows(rows, str(settings.dataset_path)))
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--data {source}: no such file (or use `{FEEDBACK}` for the feedback dataset)")
    return list(demonstrations_from_rows(read_jsonl(path), source))


@app.command()
def sft(
    data: Annotated[str, typer.Option(help="`feedback` (demonstrations users wrote) or a JSONL file.")] = FEEDBACK,
    text: Annotated[
        Path | None, typer.Option(help="Plain text instead: continued pre-training, loss on every token.")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--from", help="Version to start from (default: the current one).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 2e-5 full, 2e-4 LoRA).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_len: Annotated[int, typer.Option(min=16, help="Tokens per example (prompt + answer).")] = 512,
    lora: Annotated[
        bool, typer.Option("--lora/--full", help="Train LoRA adapters (merged on save) or all weights.")
    ] = False,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
) -> None:
    """Fine-tune a policy on demonstrations (or plain text) into a new policy version."""
    from learn.data import encode_demonstration, encode_text
    from learn.loop import LoopConfig
    from learn.sft import LoraOptions, load_causal_lm, run_card, save_policy, train_lm
    from learn.trainlog import MetricsLog

    settings = _settings()
    store = ModelStore(settings.store_dir)
    try:
        parent = base or store.current()
        if parent is None:
            raise StoreError("the model store is empty: run `rankloop model import` first")
        # Read the data before loading the model: a wrong path fails in a moment, not after the weights load.
        texts = read_texts(text) if text is not None else []
        demos = load_demonstrations(data, settings) if text is None else []
        model, tokenizer = load_causal_lm(store.path(parent), LoraOptions() if lora else None)
        if text is not None:
            examples = [e for t in texts for e in encode_text(tokenizer, t, max_len)]
            made_by, source = "pretrain", str(text)
        else:
            examples = [encode_demonstration(tokenizer, d, max_len) for d in demos]
            made_by, source = "sft", data
    except (StoreError, DataError, OSError) as exc:
        raise _fail(str(exc)) from exc
    if not examples:
        raise _fail(f"{source} holds no examples to train on")
    config = LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr or (2e-4 if lora else 2e-5), max_steps=max_steps)
    version = store.next_version()
    metrics = settings.data_dir / "runs" / f"{version}-{made_by}.jsonl"
    console.print(f"{made_by}: {len(examples)} examples from {source}, from {parent}, {'LoRA' if lora else 'full'}")
    with MetricsLog(metrics) as log:
        result = train_lm(model, tokenizer, examples, config, log, f"{made_by} → {version}")
    card = run_card(version, parent, made_by, config, result, data=source, examples=len(examples), lora=lora,
                    metrics=str(metrics))  # fmt: skip
    save_policy(model, tokenizer, store, card)
    console.print(f"wrote {version} (loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}); metrics in {metrics}")
