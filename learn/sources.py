"""Where the training stages read their data: the feedback dataset (`feedback`) or files, with the held-out splits.

`feedback` means the SQLite dataset the consumer fills from the Redis stream: ranking events for the reward model and
PPO's prompts, demonstration events for SFT and PPO's ptx term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from deploy.settings import Settings
from feedback.dataset import Dataset
from feedback.events import DemonstrationEvent, RankingEvent
from learn.data import (
    IGNORE,
    DataError,
    Demonstration,
    Example,
    demonstrations_from_rows,
    encode_demonstration,
    encode_text,
    read_jsonl,
    read_texts,
)
from learn.prompts import (
    Prompt,
    Served,
    key_of,
    prompts_from_events,
    prompts_from_file,
    served_from_events,
    split_prompts,
    unique,
)
from learn.rm_data import RankedGroup, group_from_event, hh_groups, is_held_out, is_rm_held_out

FEEDBACK = "feedback"
T = TypeVar("T")
# (the evaluation's share, the reward model's share) of prompts: two independent splits, both kept from PPO.
HeldOut = tuple[float, float]
PTX_HELD_OUT_EVERY = 10  # every 10th ptx example is kept to measure fluency (held-out LM loss)
# The fluency check reads the first this many held-out examples, not all: each round computes the new version's LM
# loss on them, and on 2 CPU cores 240 examples (a 60-minute run's) took 178 s, 48 about 40 s. The first ones, so
# that the set stops changing once the loop has them, and a version's or the reference's loss on it is known for
# good (learn.policy_eval.LossCache). The loss is compared on the same texts, version against reference, so a few
# thousand tokens measure the ratio closely.
PTX_HELD_OUT_MAX = 48


def _from_dataset(settings: Settings, read: Callable[[Dataset], T], empty: T) -> T:
    """`read` on the feedback dataset; `empty` where none was written yet (no ranking has arrived)."""
    if not settings.dataset_path.is_file():
        return empty
    with Dataset(settings.dataset_path) as dataset:
        return read(dataset)


def _rankings(settings: Settings, after: str | None = None, until: str | None = None) -> list[tuple[str, RankingEvent]]:
    return _from_dataset(settings, lambda dataset: list(dataset.rankings(after, until)), [])


def _demonstrations(settings: Settings, until: str | None = None) -> list[DemonstrationEvent]:
    return _from_dataset(settings, lambda dataset: [event for _, event in dataset.demonstrations(until)], [])


def last_event_id(settings: Settings) -> str | None:
    """The newest event in the dataset: a round that reads users' data up to it reads the same data when resumed."""
    return _from_dataset(settings, Dataset.last_id, None)


def load_demonstrations(source: str, settings: Settings, until: str | None = None) -> list[Demonstration]:
    """`feedback` (the dataset's demonstrations, up to event `until`) or a JSONL file in any shape learn.data reads."""
    if source == FEEDBACK:
        return [Demonstration(event.messages, event.answer) for event in _demonstrations(settings, until)]
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--data {source}: no such file (or use `{FEEDBACK}` for the feedback dataset)")
    return list(demonstrations_from_rows(read_jsonl(path), source))


def load_groups(
    source: str,
    settings: Settings,
    tokenizer: Any,
    max_len: int,
    after: str | None = None,
    limit: int | None = None,
    skip: int = 0,
    until: str | None = None,
) -> list[RankedGroup]:
    """`feedback` (ranking events, those after event `after` and up to `until` when given) or an HH-RLHF pairwise
    file."""
    if source == FEEDBACK:
        groups = [group_from_event(event_id, event, max_len) for event_id, event in _rankings(settings, after, until)]
        return [g for g in groups if g is not None][skip:][:limit]
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--data {source}: no such file (or use `{FEEDBACK}` for the feedback dataset)")
    return list(hh_groups(path, tokenizer, max_len, limit, skip))


def count_rankings(settings: Settings, after: str | None) -> int:
    """Ranking events after event `after`, counted in SQL: the daemon asks at every poll."""
    return _from_dataset(settings, lambda dataset: dataset.count("ranking", after), 0)


def round_prompts(
    settings: Settings,
    tokenizer: Any,
    prompt_file: Path | None,
    held_out: HeldOut,
    max_len: int,
    until: str | None = None,
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held out) prompts: users' ranked prompts (up to event `until`), then those of `prompt_file`, each
    once. Train leaves out the reward model's held-out prompts too: their rankings judge the round (agreement)."""
    evaluation, judging = held_out
    prompts = prompts_from_events((event for _, event in _rankings(settings, until=until)), max_len)
    if prompt_file is not None:
        prompts += prompts_from_file(prompt_file, tokenizer, max_len)
    train, held = split_prompts(unique(prompts, key_of), key_of, evaluation)
    return [p for p in train if not is_rm_held_out(p.key, judging)], held


def served_comparisons(
    settings: Settings, parent: str, held_out: HeldOut, max_prompt_len: int, until: str | None = None
) -> list[Served]:
    """The ranked comparisons `parent` wrote (up to event `until`), as PPO rollouts: each comparison once, none of
    a held-out prompt (the evaluation's, and the reward model's: those judge the round, so it never trains on them).
    """
    evaluation, judging = held_out
    served = served_from_events((event for _, event in _rankings(settings, until=until)), max_prompt_len)
    return [
        s
        for s in served
        if s.policy_version == parent and not is_held_out(s.key, evaluation) and not is_rm_held_out(s.key, judging)
    ]


PtxSource = Literal["demonstrations", "reference"]


@dataclass(frozen=True)
class PtxFromReference:
    """The ptx term on the answers `version` (the SFT reference) wrote to users' prompts, none of a held-out one."""

    version: str
    held_out: HeldOut


def reference_answers(served: list[Served], max_len: int) -> list[list[Example]]:
    """Every answer of each comparison, whatever users thought of it, as an example with the loss on the answer:
    samples of the reference's own distribution, so that the term holds the policy near it (its gradient at the
    reference is zero in expectation) without teaching any preference, which the chosen answers alone would."""
    return [
        [
            Example((s.prompt_ids + answer)[:max_len], ([IGNORE] * len(s.prompt_ids) + answer)[:max_len])
            for answer in s.answers
        ]
        for s in served
    ]


def ptx_examples(
    settings: Settings,
    tokenizer: Any,
    ptx: Path | PtxFromReference | None,
    max_len: int,
    until: str | None = None,
    max_prompt_len: int = 384,
) -> tuple[list[Example], list[Example], str]:
    """(train, held out, source) for the ptx term: a text or JSONL file, the reference's answers (of prompts up to
    `max_prompt_len` tokens, so that an answer keeps room within `max_len`), or (None) users' demonstrations (up to
    event `until`). Held out: every tenth example (or comparison), of which the fluency check reads the first
    PTX_HELD_OUT_MAX; the rest of them are not trained on either."""
    if isinstance(ptx, PtxFromReference):
        served = served_comparisons(settings, ptx.version, ptx.held_out, max_prompt_len, until)
        # Held out by comparison: a comparison's K answers share their prompt, which the fluency check must not see.
        groups = reference_answers(served, max_len)
        held = [e for group in groups[::PTX_HELD_OUT_EVERY] for e in group]
        train = [e for i, group in enumerate(groups) if i % PTX_HELD_OUT_EVERY for e in group]
        return train, held[:PTX_HELD_OUT_MAX], f"{ptx.version}'s answers to users' prompts"
    if ptx is not None:
        if not ptx.is_file():
            raise DataError(f"--ptx-data {ptx}: no such file")
        examples = [e for t in read_texts(ptx) for e in encode_text(tokenizer, t, max_len)]
        source = str(ptx)
    else:
        demos = load_demonstrations(FEEDBACK, settings, until)
        examples = [encode_demonstration(tokenizer, d, max_len) for d in demos]
        source = "feedback demonstrations"
    held = examples[::PTX_HELD_OUT_EVERY]
    train = [e for i, e in enumerate(examples) if i % PTX_HELD_OUT_EVERY]
    return train, held[:PTX_HELD_OUT_MAX], source
