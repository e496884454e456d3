"""`rankloop learn …`: the training stages, each writing a new version to the model store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from deploy.model_store import ModelStore, StoreError
from deploy.settings import Settings
from feedback.dataset import event_order
from learn.data import DataError, Demonstration, demonstrations_from_rows, read_jsonl, read_texts
from rankloop.console import fail, settings_or_exit

if TYPE_CHECKING:
    from learn.rm_data import RankedGroup

app = typer.Typer(help="Train: SFT on demonstrations, the reward model on rankings.", no_args_is_help=True)
console = Console(stderr=True)

FEEDBACK = "feedback"


def _settings() -> Settings:
    settings = settings_or_exit()
    import torch

    torch.set_num_threads(settings.learn_threads or torch.get_num_threads())
    return settings


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
        raise fail(str(exc)) from exc
    if not examples:
        raise fail(f"{source} holds no examples to train on")
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


def load_groups(source: str, settings: Settings, tokenizer: Any, max_len: int, after: str | None,
                limit: int | None, skip: int) -> list[RankedGroup]:  # fmt: skip
    """`feedback` (ranking events, those after event `after` when given) or an HH-RLHF pairwise file."""
    from learn.rm_data import group_from_event, hh_groups

    if source == FEEDBACK:
        from feedback.dataset import Dataset

        with Dataset(settings.dataset_path) as dataset:
            events = list(dataset.events("ranking", after))
        groups = [group_from_event(e.id, e.data, max_len) for e in events]
        return [g for g in groups if g is not None][skip:][:limit]
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--data {source}: no such file (or use `{FEEDBACK}` for the feedback dataset)")
    return list(hh_groups(path, tokenizer, max_len, limit, skip))


@app.command()
def rm(
    data: Annotated[
        str, typer.Option(help="`feedback` (users' rankings) or an HH-RLHF chosen/rejected JSONL(.gz).")
    ] = FEEDBACK,
    resume_from: Annotated[
        str | None, typer.Option("--from", help="Continue this reward model (rNNNN) on new data.")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Policy whose backbone starts a new reward model (default: the SFT reference).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 1e-5 full, 1e-4 LoRA).")] = None,
    batch_prompts: Annotated[int, typer.Option(min=1, help="Whole prompts (all their answers) per step.")] = 4,
    max_len: Annotated[
        int, typer.Option(min=16, help="Tokens per answer with its prompt (the prompt is cut first).")
    ] = 512,
    held_out: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of prompts kept for evaluation.")] = 0.1,
    lora: Annotated[bool, typer.Option("--lora/--full")] = False,
    limit: Annotated[int | None, typer.Option(help="Use at most this many prompts.")] = None,
    skip: Annotated[
        int, typer.Option(min=0, help="Skip this many prompts first (e.g. to hold a file's tail out).")
    ] = 0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
) -> None:
    """Train the reward model on rankings (K-wise, whole prompts per batch) into a new version rNNNN."""
    from learn.loop import LoopConfig
    from learn.reward_model import load_reward_model, reference_offset, save_reward_model, train_reward_model
    from learn.rm_data import split
    from learn.sft import LoraOptions, run_card
    from learn.trainlog import MetricsLog

    settings = _settings()
    policies, rewards = ModelStore(settings.store_dir), ModelStore(settings.reward_store_dir, prefix="r")
    try:
        parent: str | None
        if resume_from is not None:
            folder, parent = rewards.path(resume_from), resume_from
            after = rewards.card(resume_from).details.get("last_event_id")
        else:
            parent = base or policies.reference()
            if parent is None:
                raise StoreError("the model store is empty: run `rankloop model import` first")
            folder, after = policies.path(parent), None
        model, tokenizer = load_reward_model(folder, LoraOptions() if lora else None)
        groups = load_groups(data, settings, tokenizer, max_len, after, limit, skip)
    except (StoreError, DataError, OSError) as exc:
        raise fail(str(exc)) from exc
    train, evaluation_set = split(groups, held_out)
    if not train:
        raise fail(f"{data} holds no new ranked prompts to train on" + (f" after {after}" if after else ""))
    config = LoopConfig(epochs=epochs, batch_size=batch_prompts, lr=lr or (1e-4 if lora else 1e-5),
                        max_steps=max_steps)  # fmt: skip
    version = rewards.next_version()
    metrics = settings.data_dir / "runs" / f"{version}-rm.jsonl"
    console.print(f"reward model {version}: {len(train)} prompts to train on, {len(evaluation_set)} held out, "
                  f"from {parent}")  # fmt: skip
    with MetricsLog(metrics) as log:
        result, evaluation = train_reward_model(model, tokenizer, train, evaluation_set, config, log)
    offset, basis = reference_offset(model, train, int(tokenizer.pad_token_id), policies.reference())
    last_event = max((g.event_id for g in groups if g.event_id), key=event_order, default=after)
    card = run_card(version, parent, "reward_model", config, result, data=data, prompts=len(train),
                    held_out_prompts=len(evaluation_set), lora=lora, metrics=str(metrics), eval=vars(evaluation),
                    offset=offset, offset_basis=basis, last_event_id=last_event)  # fmt: skip
    save_reward_model(model, tokenizer, rewards, card, offset, basis)
    console.print(f"wrote {version}: held-out accuracy {evaluation.accuracy:.3f} over {evaluation.groups} prompts, "
                  f"loss {evaluation.loss:.3f}; offset {offset:.3f} ({basis})")  # fmt: skip
