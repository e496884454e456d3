"""The two learning rounds the command line and the learner daemon run: update the reward model on new rankings,
and a PPO round from a policy version to a new one. Each writes a new version to its model store with a card.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from deploy.model_store import Card, ModelStore, StoreError
from deploy.settings import Settings
from feedback.dataset import event_order
from learn import lower_cache
from learn.data import Example
from learn.device import device_of
from learn.distributed import agreed, same_start, world, written_by_main
from learn.layers import split_point
from learn.loop import LoopConfig
from learn.policy_eval import (
    EVAL_SEED,
    Agreement,
    Caches,
    PolicyEval,
    Sampling,
    agreement,
    answers_key,
    evaluate_policy,
    held_out_lm_loss,
    loss_key,
    sample_answers,
    step_kl,
)
from learn.ppo import AdapterOff, Models, backbone
from learn.ppo_run import PPORound, RoundConfig, checkpoint_meta, load_models
from learn.precision import autocast
from learn.prompts import DEFAULT_PROMPTS, Prompt, Served, key_of, prompts_from_file, split_prompts
from learn.reward_model import Evaluation
from learn.rm_data import split
from learn.sources import (
    FEEDBACK,
    PtxFromReference,
    PtxSource,
    last_event_id,
    load_groups,
    ptx_examples,
    round_prompts,
    served_comparisons,
)
from learn.trainlog import MetricsLog, step_progress
from learn.weights import (
    LoraOptions,
    as_stored,
    load_causal_lm,
    load_tokenizer,
    pad_id,
    run_card,
    save_policy,
    version_adapter,
)

log = logging.getLogger("rankloop.learner")
StepHook = Callable[[int, int, dict[str, float]], None]  # (iteration, of, figures)
PhaseHook = Callable[[str], None]  # what a round starts doing now, in a few words
# Held-out ranked prompts that judge a round (the reward model's accuracy, the new policy's agreement): the newest
# this many: with K=4 about 350 answer pairs (a 95% interval of about +-0.05 around a share), and a cost that stops
# growing with the loop's age (each round adds its held-out share of its prompts, a fifth by default).
JUDGED_GROUPS = 64
LEGACY_HELD_OUT = 0.1  # the share of reward models whose cards predate the setting
DEFAULT_HELD_OUT = 0.2  # settings.learn_rm_held_out's default


def keep_lowers(settings: Settings) -> None:
    """The process's cache of lower-layer states, to the settings' budget, kept at PPO's and the reward model's
    splits."""
    lower_cache.CACHE.configure(
        settings.learn_lower_cache_mb * 2**20, (settings.learn_train_layers, settings.learn_rm_train_layers)
    )


@dataclass(frozen=True)
class RMOptions:
    data: str = FEEDBACK
    resume_from: str | None = None  # rNNNN to continue on the rankings that arrived after it
    base: str | None = None  # policy whose backbone starts a new reward model (default: the SFT reference)
    epochs: int = 1
    lr: float | None = None
    batch_prompts: int = 4
    max_len: int = 512
    # Share of prompts held out; None: a continued model keeps its chain's (with another share, prompts it trained
    # on would be held out: the buckets nest), a new one takes the default of settings.learn_rm_held_out.
    held_out: float | None = None
    lora: bool = False
    limit: int | None = None
    skip: int = 0
    max_steps: int | None = None
    bf16: bool = False  # bf16 matrix products (learn.precision)
    device: str = "cpu"  # where the round computes (learn.device)
    train_layers: int = 0  # upper layers trained (and the head); 0: all
    readout: str = "last"  # how the model reads its score (learn.rl_math.sequence_scores)
    max_train: int | None = None  # train on the newest this many new ranked prompts at most; None: all
    seed: int = 0  # the new head's initialisation and the order of the batches


def held_out_of(rewards: ModelStore, version: str) -> float:
    """The share of ranked prompts reward model `version` (and its chain) never trained on."""
    return float(rewards.card(version).details.get("held_out", LEGACY_HELD_OUT))


@dataclass(frozen=True)
class RMResult:
    version: str
    evaluation: Evaluation
    train_prompts: int
    card: Card
    seconds: float


def rm_round(settings: Settings, options: RMOptions, show_progress: bool = True) -> RMResult:
    """Train (or continue) the reward model on the new rankings (the newest `max_train` of them); evaluate it on
    the newest JUDGED_GROUPS held-out prompts, old and new."""
    started = time.perf_counter()
    keep_lowers(settings)
    from learn.reward_model import (
        group_lowers,
        load_reward_model,
        readout_of,
        reference_norm,
        save_reward_model,
        train_reward_model,
    )

    policies, rewards = ModelStore(settings.store_dir), ModelStore(settings.reward_store_dir, prefix="r")
    parent: str | None
    fraction = options.held_out if options.held_out is not None else DEFAULT_HELD_OUT
    if options.resume_from is not None:
        folder, parent = rewards.path(options.resume_from), options.resume_from
        after = rewards.card(options.resume_from).details.get("last_event_id")
        if options.held_out is None:
            fraction = held_out_of(rewards, options.resume_from)
    else:
        parent = options.base or policies.reference()
        if parent is None:
            raise StoreError("the model store is empty: run `rankloop model import` first")
        folder, after = policies.path(parent), None
    torch.manual_seed(options.seed)  # a new head starts at random: the same round starts from the same head
    model, tokenizer = load_reward_model(
        folder,
        LoraOptions() if options.lora else None,
        train_layers=options.train_layers,
        device=options.device,
        # A continued model keeps the readout its head learned (its config's), whatever the setting says now.
        readout=options.readout if options.resume_from is None else None,
    )
    same_start(model)  # and every process from rank 0's weights
    # Users keep ranking while the processes read: all read up to the newest event rank 0 saw.
    until = agreed(lambda: last_event_id(settings)) if options.data == FEEDBACK else None
    new = load_groups(
        options.data, settings, tokenizer, options.max_len, after, options.limit, options.skip, until=until
    )
    train, held = split(new, fraction)
    if after is not None:  # the held-out prompts of earlier rounds still measure this one
        _, held = split(load_groups(options.data, settings, tokenizer, options.max_len), fraction)
    held = held[-JUDGED_GROUPS:]
    # Users rank faster than a round learns: the backlog of a round's length would make the next round that much
    # longer, and so on. The newest are the ones the served version wrote, PPO's own rollouts; the older stay in
    # the dataset (the round still moves past them).
    skipped = max(0, len(train) - options.max_train) if options.max_train is not None else 0
    train = train[skipped:]
    if not train:
        since = f" after {after}" if after else ""
        raise StoreError(f"{options.data} holds no new ranked prompts to train on{since}")
    config = LoopConfig(
        epochs=options.epochs,
        batch_size=options.batch_prompts,
        lr=options.lr or (1e-4 if options.lora else settings.learn_rm_lr),
        max_steps=options.max_steps,
        seed=options.seed,
    )
    version = agreed(rewards.next_version)  # rank 0 publishes it; the others must name the same
    metrics = settings.data_dir / "runs" / f"{version}-rm.jsonl"
    pad = int(tokenizer.pad_token_id)
    with MetricsLog(metrics) as log, autocast(options.bf16, options.device):
        lowers = group_lowers(model, train, pad)  # once, for every epoch and for the offset
        result, evaluation = train_reward_model(
            model, tokenizer, train, held, config, log, show_progress=show_progress, lowers=lowers
        )
        norm = reference_norm(model, train, pad, policies.reference(), lowers=lowers)
    last_event = max((g.event_id for g in new if g.event_id), key=event_order, default=after)
    card = run_card(
        version,
        parent,
        "reward_model",
        config,
        result,
        data=options.data,
        prompts=len(train),
        skipped_prompts=skipped,
        held_out_prompts=len(held),
        held_out=fraction,
        lora=options.lora,
        metrics=str(metrics),
        eval=vars(evaluation),
        offset=norm.offset,
        offset_basis=norm.basis,
        score_spread=norm.spread,
        last_event_id=last_event,
        bf16=options.bf16,
        device=options.device,
        train_layers=options.train_layers,
        readout=readout_of(model),
    )
    written_by_main(lambda: save_reward_model(model, tokenizer, rewards, card, norm))
    return RMResult(version, evaluation, len(train), card, time.perf_counter() - started)


@dataclass(frozen=True)
class PPOOptions:
    parent: str | None = None  # policy version to start from (default: the current one)
    # The version the new one would replace, which wrote the served rollouts and is judged against: `parent`
    # (default), or the served version where the round builds on a version users were never served (a chain the
    # gate could not decide yet, settings.learn_build_on).
    replaces: str | None = None
    reward: str | None = None  # reward model rNNNN (default: the latest)
    prompt_file: Path | None = None
    ptx_file: Path | None = None
    ptx_source: PtxSource = "demonstrations"  # where no file is given (learn.sources.ptx_examples)
    held_out: float = 0.1  # the evaluation's prompts (the reward model's own share judges the round)
    max_prompt_len: int = 384
    eval_prompts: int = 16
    eval_samples: int = 1  # answers per evaluation prompt
    fresh: bool = False  # ignore a checkpoint of an interrupted round
    bf16: bool = False  # bf16 matrix products (learn.precision)
    device: str = "cpu"  # where the round computes (learn.device)


@dataclass(frozen=True)
class PPOResult:
    version: str
    parent: str
    replaces: str  # the version judged against (the parent, or the served version a chain builds on)
    before: PolicyEval
    after: PolicyEval
    agreement: Agreement
    reference_ptx: float | None  # the SFT reference's held-out LM loss, the fluency bar
    card: Card
    resumed_at: int
    seconds: dict[str, float]  # where the round's time went, by phase: load, evaluate_before, iterations, judge, ...


def ppo_round(
    settings: Settings,
    config: RoundConfig,
    options: PPOOptions,
    on_step: StepHook | None = None,
    show_progress: bool = True,
    on_phase: PhaseHook | None = None,
) -> PPOResult:
    """A PPO round from `options.parent` into a new policy version; resumes an interrupted round of the same
    parent, reward model and configuration from its checkpoint."""
    with autocast(options.bf16, options.device):
        return _ppo_round(settings, config, options, on_step, show_progress, Clock(on_phase))


class Clock:
    """The seconds each phase of a round took, and a word to whoever watches when the next one starts."""

    def __init__(self, on_phase: PhaseHook | None) -> None:
        self.on_phase, self.seconds = on_phase, {}  # type: ignore[var-annotated]
        self.phase, self.since = "load", time.perf_counter()

    def next(self, phase: str, saying: str = "") -> None:
        now = time.perf_counter()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.since
        self.phase, self.since = phase, now
        if saying and self.on_phase is not None:
            self.on_phase(saying)


@dataclass(frozen=True)
class RoundInputs:
    """What a round starts from, resolved: the versions, and the newest event of users' data it reads."""

    parent: str
    reference: str
    reward: str
    until: str | None  # a resumed round reads up to the same event as when it started
    checkpoint: Path
    judging: float  # the reward model's held-out share: those prompts' rankings judge the round, PPO never sees them
    replaces: str  # the version judged against, which wrote the served rollouts (PPOOptions.replaces)


@dataclass(frozen=True)
class RoundData:
    models: Models
    train: list[Prompt]
    held: list[Prompt]
    served: list[Served]
    ptx_train: list[Example]
    ptx_held: list[Example]
    ptx_source: str
    evaluation_prompts: list[Prompt]
    eval_on: str


def _ppo_round(
    settings: Settings,
    config: RoundConfig,
    options: PPOOptions,
    on_step: StepHook | None,
    show_progress: bool,
    clock: Clock,
) -> PPOResult:
    keep_lowers(settings)
    inputs = _resolve(settings, options)
    data = _load(settings, config, options, inputs)
    config = config.for_ptx(ptx_from_reference(options))
    trainer = PPORound(data.models, config, data.train, data.ptx_train, data.served)
    meta = {
        "parent": inputs.parent,
        "reference": inputs.reference,
        "reward": inputs.reward,
        "config": json.dumps(asdict(config)),
        "prompts": len(data.train),
        "served": len(data.served),
        "ptx": len(data.ptx_train),
        "until": inputs.until,
    }
    if inputs.replaces != inputs.parent:  # a chain's round; the others' checkpoints read as they always did
        meta["replaces"] = inputs.replaces
    resumed = trainer.resume(inputs.checkpoint, meta)
    caches = Caches.under(settings.data_dir / "evals")
    clock.next("evaluate_before", f"evaluating {inputs.replaces}")
    store = ModelStore(settings.store_dir)
    before = _evaluate_replaced(data, config, options, inputs, caches, resumed, store.path(inputs.replaces))
    metrics = settings.data_dir / "runs" / f"{inputs.parent}-ppo-{inputs.reward}.jsonl"
    start = trainer.iteration
    clock.next("iterations")
    _train(trainer, config, inputs.checkpoint, meta, metrics, on_step, show_progress)
    clock.next("evaluate_after", "evaluating the new version")
    stored = as_stored(data.models.policy)  # the version as users would get it, not the round's fp32 adapters
    after, after_answers = evaluate_policy(
        replace(data.models, policy=stored),
        data.evaluation_prompts,
        data.ptx_held,
        config.max_new_tokens,
        options.eval_samples,
    )
    known = (caches.losses, inputs.reference)
    reference_ptx = held_out_lm_loss(
        data.models.reference, data.models.tokenizer, data.ptx_held, known, data.models.split
    )
    # Timed apart from the sampling and LM losses before it: the two grow with different settings (answers' length
    # limit and the evaluation's prompts, against the held-out rankings' count and length).
    clock.next("judge", "judging the new version on held-out rankings")
    from_reference = inputs.replaces == inputs.reference
    replaced = replaced_model(data.models, config, store.path(inputs.replaces), inputs)
    judged = judge_on_held_out_rankings(settings, data.models, replaced, stored, inputs.judging, from_reference)
    if inputs.replaces == inputs.parent:
        parent = replaced
    else:  # a chain: the step is from the parent, which wrote no rollouts
        parent = parent_model(
            data.models, config, store.path(inputs.parent), inputs.parent == inputs.reference, wrote_rollouts=False
        )
    del replaced
    step = step_kl(stored, parent, after_answers, pad_id(data.models.tokenizer), data.models.split)
    after = replace(after, parent_kl=step)
    del parent  # where it was loaded for the judgement, a whole model: not held through the writing
    clock.next("publish", "writing the new version")
    card = _publish(settings, config, options, inputs, data, stored, (before, after, judged, reference_ptx), metrics)
    # After the version is published and its checkpoint gone (a failure here must not resume into a second version):
    # the caches only save the next round's evaluation of this version its sampling and its LM loss.
    try:  # when this version is the one replaced, its answers and its loss are known
        caches.answers.put(card.version, after_answers)
        if after.ptx_loss is not None:
            caches.losses.put(card.version, loss_key(data.ptx_held, stored), after.ptx_loss)
    except OSError as exc:
        log.warning("could not keep %s's evaluation figures (%s): the next round computes them", card.version, exc)
    clock.next("done")
    return PPOResult(
        card.version, inputs.parent, inputs.replaces, before, after, judged, reference_ptx, card, start, clock.seconds
    )


def _resolve(settings: Settings, options: PPOOptions) -> RoundInputs:
    """The parent, reference and reward model of the round, and the event its data ends at."""
    store, rewards = ModelStore(settings.store_dir), ModelStore(settings.reward_store_dir, prefix="r")
    parent, reference = options.parent or store.current(), store.reference()
    reward = options.reward or next(reversed(rewards.versions()), None)
    if parent is None or reference is None:
        raise StoreError("the model store is empty: run `rankloop model import` first")
    if reward is None:
        raise StoreError("no reward model yet: train one with `rankloop learn rm`")
    checkpoint = settings.data_dir / "checkpoints" / "ppo.ckpt"
    if options.fresh:
        checkpoint.unlink(missing_ok=True)
    until = agreed(lambda: _until(settings, checkpoint, parent, reward))
    replaces = options.replaces or parent
    return RoundInputs(parent, reference, reward, until, checkpoint, held_out_of(rewards, reward), replaces)


def _until(settings: Settings, checkpoint: Path, parent: str, reward: str) -> str | None:
    """Users keep ranking while a round runs: the round reads their data up to the newest event at its start, and
    a resumed round up to the same event, so that it trains on what it started with."""
    pending = checkpoint_meta(checkpoint)
    if pending is not None and (pending.get("parent"), pending.get("reward")) == (parent, reward):
        until: str | None = pending.get("until")
        return until
    return last_event_id(settings)


def _load(settings: Settings, config: RoundConfig, options: PPOOptions, inputs: RoundInputs) -> RoundData:
    """The round's models, rollouts, prompts, ptx examples and evaluation prompts."""
    store, rewards = ModelStore(settings.store_dir), ModelStore(settings.reward_store_dir, prefix="r")
    served = []
    if config.rollouts == "served":
        served = served_comparisons(
            settings, inputs.replaces, (options.held_out, inputs.judging), options.max_prompt_len, inputs.until
        )
    torch.manual_seed(config.seed)  # the adapters' random initialisation, so that a round is repeatable
    models = load_models(
        store.path(inputs.parent),
        store.path(inputs.reference),
        rewards.path(inputs.reward),
        config,
        store.path(inputs.replaces) if served else None,
        options.device,
    )
    same_start(models.policy)
    same_start(models.value)
    train, held = round_prompts(
        settings,
        models.tokenizer,
        options.prompt_file,
        (options.held_out, inputs.judging),
        options.max_prompt_len,
        inputs.until,
    )
    if not train and not served:
        raise StoreError("no prompts to train on: rank some answers first, or pass --prompts FILE")
    ptx = options.ptx_file or (
        PtxFromReference(inputs.reference, (options.held_out, inputs.judging)) if ptx_from_reference(options) else None
    )
    ptx_train, ptx_held, ptx_source = ptx_examples(
        settings, models.tokenizer, ptx, 512, inputs.until, max_prompt_len=options.max_prompt_len
    )
    evaluation_prompts, eval_on = evaluation_set(models.tokenizer, held, options)
    return RoundData(models, train, held, served, ptx_train, ptx_held, ptx_source, evaluation_prompts, eval_on)


def ptx_from_reference(options: PPOOptions) -> bool:
    """Whether the ptx texts are the reference's own answers (no file given, source `reference`)."""
    return options.ptx_file is None and options.ptx_source == "reference"


def _evaluate_replaced(
    data: RoundData,
    config: RoundConfig,
    options: PPOOptions,
    inputs: RoundInputs,
    caches: Caches,
    resumed: bool,
    folder: Path,
) -> PolicyEval:
    """The evaluation of the version the new one would replace (`inputs.replaces`, stored in `folder`): kept beside
    the checkpoint, so that a resumed round does not redo it."""
    before_file = inputs.checkpoint.with_suffix(".before.json")
    if resumed and before_file.is_file():
        return PolicyEval(**json.loads(before_file.read_text()))
    if inputs.replaces == inputs.parent:
        # The policy is still its parent here, unless the round resumed without its parent's figures: its answers
        # and loss are then the trained policy's, and must not be kept as the parent's.
        models, keep = data.models, not resumed
    else:  # a chain: the served version, whatever the policy has become
        models, keep = replace(data.models, policy=replaced_model(data.models, config, folder, inputs)), True
    before, _ = evaluate_policy(
        models,
        data.evaluation_prompts,
        data.ptx_held,
        config.max_new_tokens,
        options.eval_samples,
        caches=caches if keep else None,
        version=inputs.replaces,
    )
    if world().main:
        before_file.parent.mkdir(parents=True, exist_ok=True)
        before_file.write_text(json.dumps(before.figures()))
    return before


def _train(
    trainer: PPORound,
    config: RoundConfig,
    checkpoint: Path,
    meta: dict[str, Any],
    metrics: Path,
    on_step: StepHook | None,
    show_progress: bool,
) -> None:
    """The iterations left, each checkpointed and logged."""
    with (
        MetricsLog(metrics) as log,
        step_progress(f"PPO from {meta['parent']}", config.iterations - trainer.iteration, show_progress) as progress,
    ):
        for _ in range(trainer.iteration, config.iterations):
            figures = trainer.step()
            trainer.save(checkpoint, meta)  # a kill now loses nothing; a kill during the step, only that step
            log.write(trainer.iteration, **figures)
            progress.advance(reward=figures["reward"], kl=figures["kl_per_answer"], beta=figures["beta"])
            if on_step is not None:
                on_step(trainer.iteration, config.iterations, figures)


Judged = tuple[PolicyEval, PolicyEval, Agreement, float | None]  # before, after, agreement, the reference's ptx loss


def _publish(
    settings: Settings,
    config: RoundConfig,
    options: PPOOptions,
    inputs: RoundInputs,
    data: RoundData,
    stored: Any,
    judged: Judged,
    metrics: Path,
) -> Card:
    """The new version into the store, its card with the round's figures; the round's checkpoint removed."""
    before, after, on_rankings, reference_ptx = judged
    store = ModelStore(settings.store_dir)
    version = agreed(store.next_version)
    card = Card(
        version=version,
        parent=inputs.parent,
        made_by="ppo",
        details={
            "reward_model": inputs.reward,
            "reference": inputs.reference,
            "iterations": config.iterations,
            "bf16": options.bf16,
            "device": options.device,
            "config": asdict(config),
            "train_prompts": len(data.train),
            "held_out_prompts": len(data.held),
            "replaces": inputs.replaces,
            "rollouts": f"{len(data.served)} ranked comparisons {inputs.replaces} wrote" if data.served else "sampled",
            "eval_on": data.eval_on,
            "eval_prompts": len(data.evaluation_prompts),
            "ptx": {"source": data.ptx_source, "train": len(data.ptx_train), "held_out": len(data.ptx_held)},
            "eval": {"before": before.figures(), "after": after.figures(), "reference_ptx_loss": reference_ptx},
            "agreement": on_rankings.figures(),
            "agreement_by": settings.learn_agreement_by,  # the share the gate reads
            "metrics": str(metrics),
        },
    )
    adapter = version_adapter(data.models.policy, store, inputs.parent, settings.max_adapter_rank)
    if adapter is not None:
        card.details["adapter"] = {"base": adapter[1], "rank": adapter[0].rank}

    def write() -> None:
        save_policy(stored, data.models.tokenizer, store, card, adapter)
        inputs.checkpoint.unlink(missing_ok=True)
        inputs.checkpoint.with_suffix(".before.json").unlink(missing_ok=True)

    written_by_main(write)
    return card


def evaluation_set(tokenizer: Any, held: list[Prompt], options: PPOOptions) -> tuple[list[Prompt], str]:
    """The prompts versions are judged on: held-out prompts of users' and of the prompt file, else the held-out
    part of rankloop's own prompt set (users are never asked those)."""
    if held:
        return held[: options.eval_prompts], "held-out prompts"
    _, shipped = split_prompts(
        prompts_from_file(DEFAULT_PROMPTS, tokenizer, options.max_prompt_len), key_of, options.held_out
    )
    return shipped[: options.eval_prompts], f"held-out prompts of {DEFAULT_PROMPTS.name}"


@dataclass(frozen=True)
class VersionToSample:
    """A served version and the reference, as sampling its evaluation answers needs them (`Sampling`)."""

    policy: Any
    reference: Any
    tokenizer: Any
    split: int = 0


Ahead = Literal["sampled", "kept", "unsettled"]


def answers_ahead(
    settings: Settings, options: PPOOptions, config: RoundConfig, starting: Callable[[], None] | None = None
) -> Ahead:
    """The served version's (`options.parent`) answers to the evaluation prompts the next round would take, sampled
    now and kept (learn.policy_eval.AnswerCache): the round that replaces it then only scores them. For a learner
    with time on its hands (waiting for rankings). `kept`: they were already; `unsettled`: the prompts the next
    round takes may still change, and nothing was sampled. `starting` is called when the sampling starts."""
    store = ModelStore(settings.store_dir)
    version, reference = options.parent or store.current(), store.reference()
    if version is None or reference is None:
        return "unsettled"
    tokenizer, until = load_tokenizer(store.path(version)), last_event_id(settings)
    # The evaluation takes the first `eval_prompts` of users' held-out prompts, oldest first, then the prompt
    # file's; with none at all, the shipped set's. Until users have asked that many, their next held-out prompt
    # changes the set, unless there is no file and they have asked none (simulated users never ask one).
    shares = (options.held_out, 0.0)  # the reward model's share leaves out train prompts only
    _, users = round_prompts(settings, tokenizer, None, shares, options.max_prompt_len, until)
    if len(users) < options.eval_prompts and (users or options.prompt_file is not None):
        return "unsettled"
    held = users
    if options.prompt_file is not None:
        held = round_prompts(settings, tokenizer, options.prompt_file, shares, options.max_prompt_len, until)[1]
    prompts, _ = evaluation_set(tokenizer, held, options)
    caches = Caches.under(settings.data_dir / "evals")
    if caches.answers.get(version, answers_key(prompts, config.max_new_tokens, options.eval_samples, EVAL_SEED)):
        return "kept"
    if starting is not None:
        starting()
    with autocast(options.bf16, options.device):
        policy, _ = load_causal_lm(store.path(version), device=options.device)
        base = policy if version == reference else load_causal_lm(store.path(reference), device=options.device)[0]
        split = split_point(backbone(policy), config.train_layers)
        sampled: Sampling = VersionToSample(policy, base, tokenizer, split)
        answers = sample_answers(sampled, prompts, config.max_new_tokens, options.eval_samples, EVAL_SEED)
    caches.answers.put(version, answers)
    return "sampled"


def parent_model(
    models: Any, config: RoundConfig, parent_folder: Path, is_reference: bool, wrote_rollouts: bool = True
) -> Any:
    """The version a round started from, as the round's models hold it (with LoRA, the policy with its adapters
    off; else the behaviour policy, where the rollouts were its served answers (`wrote_rollouts`: not in a chain,
    where the served version wrote them); else the reference, where it is the parent), or loaded from the store."""
    parent: Any = AdapterOff(models.policy) if config.lora else (models.behaviour if wrote_rollouts else None)
    if parent is None and is_reference:  # sampled rollouts from the reference: its weights are already here
        parent = models.reference
    if parent is None:
        parent, _ = load_causal_lm(parent_folder, device=device_of(models.policy))
    return parent


def replaced_model(models: Any, config: RoundConfig, folder: Path, inputs: RoundInputs) -> Any:
    """The version a round's new one would replace (`inputs.replaces`, stored in `folder`): its parent as
    `parent_model` holds it, or, in a chain, the served version: the reference, the writer of the served rollouts
    (`models.behaviour`), or loaded from the store."""
    if inputs.replaces == inputs.parent:
        return parent_model(models, config, folder, inputs.parent == inputs.reference)
    if inputs.replaces == inputs.reference:
        return models.reference
    if models.behaviour is not None:
        return models.behaviour
    model, _ = load_causal_lm(folder, device=device_of(models.policy))
    return model.requires_grad_(False).eval()


def judge_on_held_out_rankings(
    settings: Settings, models: Any, parent: Any, stored: Any, held_out: float, parent_is_reference: bool
) -> Agreement:
    """`Agreement` of the trained policy, as stored (`stored`), with the reward model's held-out rankings, relative
    to `parent` (the version it would replace: its parent, or the served version a chain builds on) and to the SFT
    reference: the newest JUDGED_GROUPS of them at the time of judging, those that arrived while the round ran
    included. Neither the reward model nor PPO ever saw a held-out prompt, and the rankings of the round's own time
    are the most of them: the first round of a young loop has few older ones (54 pairs in the first round of a
    60-minute run, while about 24 held-out prompts, some 140 pairs, arrived during it)."""
    groups = load_groups(FEEDBACK, settings, models.tokenizer, 1024)
    _, held = split(groups, held_out)
    reference = parent if parent_is_reference else models.reference
    tokens = pad_id(models.tokenizer)
    return agreement(stored, parent, held[-JUDGED_GROUPS:], tokens, split=models.split, reference=reference)


def register(settings: Settings, card: Card) -> bool:
    """Register a new version as `ready` in the registry; False when Redis cannot be reached (a server's start-up
    registers the store's versions then)."""
    import redis

    from deploy.redis_clients import sync_redis
    from deploy.registry import Registry

    client = sync_redis(settings)
    try:
        Registry(client).register(card.version, card.parent, card.made_by, card.created, card.details)
        return True
    except redis.RedisError:
        return False
    finally:
        client.close()
