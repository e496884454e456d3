"""`rankloop learn …`: the training stages, each writing a new version to the model store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deploy.model_store import ModelStore, StoreError
from deploy.settings import Settings
from feedback.events import EventError
from learn.data import DataError, read_texts
from learn.sources import FEEDBACK, load_demonstrations
from rankloop.console import fail, settings_or_exit, training_settings_or_exit

app = typer.Typer(
    help="Learn from users: with no command, the learner daemon; or one stage (sft, rm, ppo) by hand.",
    invoke_without_command=True,
)
console = Console(stderr=True)


def compute_or_exit(settings: Settings) -> tuple[str, bool]:
    """(device, bf16) of this process's training (learn.daemon.compute), or exit saying why the device is not there."""
    from learn.daemon import compute
    from learn.device import DeviceError

    try:
        return compute(settings)
    except DeviceError as exc:
        raise fail(str(exc), 2) from exc


def say(text: str) -> None:
    """Print for the operator: once, from rank 0, when several processes run the stage (torchrun)."""
    from learn.distributed import world

    if world().main:
        console.print(text)


@app.callback()
def daemon(context: typer.Context) -> None:
    """The learner daemon (started by `rankloop up`): new rankings → reward model → PPO → a `ready` version."""
    if context.invoked_subcommand is not None:
        return
    import logging
    import signal
    import threading

    from deploy.redis_clients import sync_redis
    from learn.daemon import Learner
    from learn.metrics import serve_metrics

    settings = training_settings_or_exit()
    device, bf16 = compute_or_exit(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(message)s")
    from learn.distributed import world

    if settings.learn_metrics_port is not None and world().main:  # one port, one process: rank 0's figures
        try:
            serve_metrics(settings.learn_metrics_host, settings.learn_metrics_port)
        except OSError as exc:  # metrics are for operators; a taken port must not stop learning
            console.print(f"[yellow]learner metrics not served on port {settings.learn_metrics_port}: {exc}[/]")
    stop = threading.Event()

    def leave(signum: int, frame: object) -> None:
        # Mid-round, leave at once: the round's last checkpoint is on disk and the next start resumes it.
        stop.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    client = sync_redis(settings)
    console.print(
        f"learner: a round every {settings.learn_min_rankings} new rankings on {device}"
        f"{' (bf16 products)' if bf16 else ''}; auto-promote {'on' if settings.learn_auto_promote else 'off'}"
    )
    Learner(settings, client).run(stop)


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
    from learn.distributed import agreed, same_start, written_by_main
    from learn.loop import LoopConfig
    from learn.sft import train_lm
    from learn.sources import last_event_id
    from learn.trainlog import MetricsLog
    from learn.weights import LoraOptions, load_causal_lm, run_card, save_policy

    settings = training_settings_or_exit()
    device, _ = compute_or_exit(settings)
    store = ModelStore(settings.store_dir)
    try:
        parent = base or store.current()
        if parent is None:
            raise StoreError("the model store is empty: run `rankloop model import` first")
        # Read the data before loading the model: a wrong path fails in a moment, not after the weights load.
        texts = read_texts(text) if text is not None else []
        # Of several processes, all read the demonstrations up to the newest rank 0 saw (users keep writing them).
        until = agreed(lambda: last_event_id(settings)) if text is None and data == FEEDBACK else None
        demos = load_demonstrations(data, settings, until) if text is None else []
        model, tokenizer = load_causal_lm(store.path(parent), LoraOptions() if lora else None, device=device)
        same_start(model)
        if text is not None:
            examples = [e for t in texts for e in encode_text(tokenizer, t, max_len)]
            made_by, source = "pretrain", str(text)
        else:
            examples = [encode_demonstration(tokenizer, d, max_len) for d in demos]
            made_by, source = "sft", data
    except (StoreError, DataError, EventError, OSError) as exc:
        raise fail(str(exc)) from exc
    if not examples:
        raise fail(f"{source} holds no examples to train on")
    config = LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr or (2e-4 if lora else 2e-5), max_steps=max_steps)
    version = agreed(store.next_version)
    metrics = settings.data_dir / "runs" / f"{version}-{made_by}.jsonl"
    say(f"{made_by}: {len(examples)} examples from {source}, from {parent}, {'LoRA' if lora else 'full'}")
    with MetricsLog(metrics) as log:
        result = train_lm(model, tokenizer, examples, config, log, f"{made_by} → {version}")
    card = run_card(
        version, parent, made_by, config, result, data=source, examples=len(examples), lora=lora, metrics=str(metrics)
    )
    written_by_main(lambda: save_policy(model, tokenizer, store, card))
    say(f"wrote {version} (loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}); metrics in {metrics}")


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
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (default: RANKLOOP_LEARN_RM_LR; with --lora 1e-4).")
    ] = None,
    batch_prompts: Annotated[int, typer.Option(min=1, help="Whole prompts (all their answers) per step.")] = 4,
    max_len: Annotated[
        int, typer.Option(min=16, help="Tokens per answer with its prompt (the prompt is cut first).")
    ] = 512,
    held_out: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.9,
            help="Share of prompts kept for evaluation (default: RANKLOOP_LEARN_RM_HELD_OUT; with --from, the share "
            "that model was trained with).",
        ),
    ] = None,
    lora: Annotated[bool, typer.Option("--lora/--full")] = False,
    limit: Annotated[int | None, typer.Option(help="Use at most this many prompts.")] = None,
    skip: Annotated[
        int, typer.Option(min=0, help="Skip this many prompts first (e.g. to hold a file's tail out).")
    ] = 0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
) -> None:
    """Train the reward model on rankings (K-wise, whole prompts per batch) into a new version rNNNN."""
    from learn.rounds import RMOptions, rm_round

    settings = training_settings_or_exit()
    device, bf16 = compute_or_exit(settings)
    options = RMOptions(
        data,
        resume_from,
        base,
        epochs,
        lr,
        batch_prompts,
        max_len,
        # A new model: the setting's share; a continued one: its chain's, unless the operator says otherwise.
        settings.learn_rm_held_out if held_out is None and resume_from is None else held_out,
        lora,
        limit,
        skip,
        max_steps,
        bf16=bf16,
        device=device,
        train_layers=settings.learn_rm_train_layers,
        readout=settings.learn_rm_readout,
    )
    try:
        result = rm_round(settings, options)
    except (StoreError, DataError, EventError, OSError) as exc:
        raise fail(str(exc)) from exc
    evaluation, details = result.evaluation, result.card.details
    say(
        f"wrote {result.version} from {result.card.parent}: {result.train_prompts} prompts trained on; "
        f"held-out accuracy {evaluation.accuracy:.3f} over {evaluation.groups} prompts, loss "
        f"{evaluation.loss:.3f}; offset {details['offset']:.3f}, spread {details['score_spread']:.3f} "
        f"({details['offset_basis']})"
    )


@app.command()
def ppo(
    base: Annotated[str | None, typer.Option("--from", help="Policy version to start from (default: current).")] = None,
    reward: Annotated[str | None, typer.Option(help="Reward model rNNNN (default: the latest).")] = None,
    iterations: Annotated[int | None, typer.Option(min=1, help="Default: RANKLOOP_LEARN_PPO_ITERATIONS.")] = None,
    prompts_per_iteration: Annotated[
        int | None, typer.Option(min=1, help="Default: RANKLOOP_LEARN_PROMPTS_PER_ITERATION.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Length limit of sampled answers and evaluations (default: settings).")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Extra prompts (JSONL) besides users' ranked ones.")] = None,
    ptx_data: Annotated[
        Path | None, typer.Option(help="Text or JSONL for the pre-training term (default: RANKLOOP_LEARN_PTX_FILE).")
    ] = None,
    ptx_source: Annotated[
        str | None,
        typer.Option(
            help="Where no file is set: `demonstrations` (users') or `reference` (the SFT reference's answers to "
            "users' prompts; default: RANKLOOP_LEARN_PTX_SOURCE)."
        ),
    ] = None,
    ptx_coef: Annotated[
        float | None, typer.Option(min=0.0, help="Weight of the pre-training term (default: settings).")
    ] = None,
    ptx_loss: Annotated[
        str | None,
        typer.Option(
            help="`lm`: the LM loss of the pre-training texts; `reference_kl`: the KL to the SFT reference on them "
            "(default: RANKLOOP_LEARN_PTX_LOSS; unset, `reference_kl` on the reference's own answers)."
        ),
    ] = None,
    kl_coef: Annotated[float | None, typer.Option(min=0.0, help="Initial KL penalty (beta; default 0.05).")] = None,
    kl_target: Annotated[
        float | None, typer.Option(min=0.0, help="Per-answer KL the adaptive controller steers to (default 6).")
    ] = None,
    fixed_kl: Annotated[bool, typer.Option("--fixed-kl", help="Keep beta fixed (no adaptive controller).")] = False,
    lr: Annotated[
        float | None, typer.Option(help="Policy learning rate (default: RANKLOOP_LEARN_PPO_LR with LoRA, 1e-5 full).")
    ] = None,
    lora: Annotated[bool, typer.Option("--lora/--full")] = True,
    rollouts: Annotated[
        str | None,
        typer.Option(
            help="`served`: the answers users ranked, as the version wrote them; `sampled`: generated "
            "here (default: RANKLOOP_LEARN_ROLLOUTS)."
        ),
    ] = None,
    advantage: Annotated[
        str | None,
        typer.Option(
            help="`gae`: per-token advantages from a value model; `rloo`: each answer's return less its siblings' "
            "mean (default: RANKLOOP_LEARN_ADVANTAGE)."
        ),
    ] = None,
    clip_centre: Annotated[
        str | None,
        typer.Option(
            help="`served`: PPO's clip centred on the version that wrote the answers; `iteration`: on the policy at "
            "the start of each iteration, decoupled PPO (default: RANKLOOP_LEARN_CLIP_CENTRE)."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Default: RANKLOOP_LEARN_SEED.")] = None,
    fresh: Annotated[bool, typer.Option(help="Discard the checkpoint of an interrupted round.")] = False,
) -> None:
    """A PPO round against the reward model into a new policy version (resumes an interrupted round)."""
    from dataclasses import replace

    from learn.ppo_run import CheckpointMismatch, RoundConfig
    from learn.rounds import PPOOptions, ppo_round, register

    settings = training_settings_or_exit()
    device, bf16 = compute_or_exit(settings)
    source = rollouts or settings.learn_rollouts
    if source not in ("served", "sampled"):
        raise fail(f"--rollouts {source}: use `served` or `sampled`")
    # The daemon's round (the settings), changed only where a flag says so: the same command resumes its rounds.
    ptx_from = settings.learn_ptx_source
    if ptx_source is not None:
        if ptx_source not in ("demonstrations", "reference"):
            raise fail(f"--ptx-source {ptx_source}: use `demonstrations` or `reference`")
        ptx_from = "reference" if ptx_source == "reference" else "demonstrations"
    if ptx_loss not in (None, "lm", "reference_kl"):
        raise fail(f"--ptx-loss {ptx_loss}: use `lm` or `reference_kl`")
    if advantage not in (None, "gae", "rloo"):
        raise fail(f"--advantage {advantage}: use `gae` or `rloo`")
    if clip_centre not in (None, "served", "iteration"):
        raise fail(f"--clip-centre {clip_centre}: use `served` or `iteration`")
    config = RoundConfig.from_settings(settings)
    rate = lr or (config.lr if lora else 1e-5)
    config = config.changed(
        ptx_coef,
        None if advantage is None else ("rloo" if advantage == "rloo" else "gae"),
        None if clip_centre is None else ("iteration" if clip_centre == "iteration" else "served"),
        None if ptx_loss is None else ("lm" if ptx_loss == "lm" else "reference_kl"),
        iterations=iterations,
        prompts_per_iteration=prompts_per_iteration,
        max_new_tokens=max_new_tokens,
        lr=rate,
        value_lr=rate,
        init_kl_coef=kl_coef,
        kl_target=kl_target,
        lora=lora,
        rollouts=source,
        seed=seed,
    )
    if kl_target is not None and kl_target <= 0:
        raise fail(f"--kl-target {kl_target}: give a KL above 0, or --fixed-kl for a fixed beta")
    if fixed_kl:
        config = replace(config, kl_target=None)
    options = PPOOptions(
        parent=base,
        reward=reward,
        prompt_file=prompts,
        # An explicit --ptx-source is taken over the settings' file; --ptx-data over both.
        ptx_file=ptx_data or (None if ptx_source is not None else settings.learn_ptx_file),
        ptx_source=ptx_from,
        fresh=fresh,
        bf16=bf16,
        device=device,
    )
    try:
        result = ppo_round(settings, config, options)
    except (StoreError, DataError, EventError, OSError, CheckpointMismatch) as exc:
        raise fail(str(exc)) from exc
    before, after = result.before, result.after
    resumed = f" (resumed at iteration {result.resumed_at})" if result.resumed_at else ""
    say(
        f"wrote {result.version} from {result.parent}{resumed}: held-out mean reward {before.reward:.3f} → "
        f"{after.reward:.3f}, KL {after.kl:.2f} to the reference and {after.parent_kl:.2f} to {result.parent}, "
        f"answer length {before.answer_length:.1f} → "
        f"{after.answer_length:.1f}, empty {before.empty:.0%} → {after.empty:.0%}; agrees with "
        f"{result.agreement.per_token:.0%} of {result.agreement.pairs} held-out ranked pairs by log-ratio a token "
        f"({result.agreement.rate:.0%} summed over each answer; {result.agreement.reference:.0%} a token since the "
        "SFT reference)"
    )
    from learn.distributed import world

    if not world().main:
        return
    registered = register(settings, result.card)
    console.print(
        "registered as ready; promote it with `rankloop promote " + result.version + "`"
        if registered
        else "Redis unreachable: the server registers it when it starts"
    )


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What the learner daemon is doing, how far it is, and how its last round went."""
    import json
    import time

    from redis.exceptions import RedisError

    from deploy.learner_status import read_status
    from deploy.redis_clients import sync_redis

    settings = settings_or_exit()
    client = sync_redis(settings)
    try:
        found = read_status(client)
    except RedisError as exc:
        raise fail(f"Redis at {settings.shown_redis_url} unreachable: {exc}") from exc
    if found is None:
        raise fail("no learner has reported yet (start one with `rankloop learn` or `rankloop up`)")
    if as_json:
        print(json.dumps(found))
        return
    age = time.time() - float(found["updated"])
    console.print(f"[bold]{found['phase']}[/]: {found['detail']} ({age:.0f} s ago)")
    last = found.get("last_round")
    if last:
        console.print("last round: " + ", ".join(f"{k} {v}" for k, v in last.items()))
