"""Ranked groups for the reward model: a prompt, its K answers as token ids, and their ranking.

From the feedback dataset a group is a ranking event: the answers' token ids are the ones the policy sampled, after
the prompt's ids as the server rendered them, so the reward model scores exactly what PPO will ask it to score.
From plain pairwise files (HH-RLHF `chosen`/`rejected`) a group is K=2, rendered with the chat template.
The held-out split is by prompt, never by pair: all answers of a prompt sit on the same side.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback.events import RankingEvent
from feedback.ranking import Tiers
from learn.data import DataError


@dataclass(frozen=True)
class RankedGroup:
    prompt_key: str  # identifies the prompt (for the split)
    answers: list[list[int]]  # token ids of prompt + answer, one list per candidate
    tiers: Tiers  # best first; ties share a tier
    policy_version: str | None = None  # who wrote the answers (the normalisation uses the reference's)
    event_id: str | None = None
    answer_lens: tuple[int, ...] = ()  # tokens of each sequence that are the answer (its end); () where unknown


def prompt_key(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def is_held_out(key: str, fraction: float) -> bool:
    """The evaluation prompts: policies are judged on them and never trained on them (PPO, simulated users).

    A stable split: a prompt stays on its side as data grows (bucket from its hash)."""
    return int(key[:8], 16) % 10_000 < fraction * 10_000


def is_rm_held_out(key: str, fraction: float) -> bool:
    """The reward model's held-out prompts: a split of its own, independent of the evaluation prompts', so that
    ranked prompts land on both of its sides even when users are only ever shown training prompts."""
    return is_held_out(hashlib.sha256(f"reward-model {key}".encode()).hexdigest(), fraction)


def split(groups: list[RankedGroup], fraction: float) -> tuple[list[RankedGroup], list[RankedGroup]]:
    """(train, held out) for the reward model, by prompt: all answers of a prompt on the same side."""
    train = [g for g in groups if not is_rm_held_out(g.prompt_key, fraction)]
    held = [g for g in groups if is_rm_held_out(g.prompt_key, fraction)]
    return train, held


def group_from_event(event_id: str, event: RankingEvent, max_len: int) -> RankedGroup | None:
    """A ranking event as a group; None when the ranking orders nothing (all tied)."""
    if len(event.ranking) < 2:
        return None
    comparison = event.comparison
    answers = [_fit(comparison.prompt_token_ids, c.token_ids, max_len) for c in comparison.candidates]
    lens = tuple(min(len(c.token_ids), max_len) for c in comparison.candidates)
    # A canary's comparison holds two versions' answers: no one version wrote the group (the normalisation, which
    # averages the reference's answers, leaves it out).
    writers = {c.policy_version or comparison.policy_version for c in comparison.candidates}
    version = comparison.policy_version if len(writers) == 1 else None
    return RankedGroup(prompt_key(comparison.messages), answers, event.ranking, version, event_id, lens)


def _fit(prompt_ids: list[int], answer_ids: list[int], max_len: int) -> list[int]:
    # Keep the answer whole and cut the prompt from the left: the answer is what the score is about.
    ids = list(prompt_ids) + list(answer_ids)
    return ids[-max_len:]


def encode_pair(tokenizer: Any, messages: list[dict[str, str]], answer: str, max_len: int) -> list[int]:
    """Prompt rendered with the chat template, then the answer and the end-of-turn token, as the policy emits them."""
    return encode_answer(tokenizer, messages, answer, max_len)[0]


def encode_answer(tokenizer: Any, messages: list[dict[str, str]], answer: str, max_len: int) -> tuple[list[int], int]:
    """`encode_pair`'s ids and how many of them, at the end, are the answer (a readout pooling the answer needs it)."""
    prompt = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _fit(prompt_ids, answer_ids, max_len), min(len(answer_ids), max_len)


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: …\\n\\nAssistant: …' into chat messages."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError("not an HH-RLHF dialogue (expected '\\n\\nHuman: …\\n\\nAssistant: …')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def hh_groups(
    path: Path, tokenizer: Any, max_len: int, limit: int | None = None, skip: int = 0
) -> Iterator[RankedGroup]:
    """Pairs of an HH-RLHF file (optionally gzipped) as K=2 groups, chosen first: rows skip..skip+limit."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        taken = 0
        for n, line in enumerate(lines):
            if n < skip or not line.strip():
                continue
            if limit is not None and taken >= limit:
                return
            row = json.loads(line)
            chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
            if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
                continue  # the two must share the dialogue and differ in the last Assistant turn
            prompt = chosen[:-1]
            encoded = [encode_answer(tokenizer, prompt, c[-1]["content"], max_len) for c in (chosen, rejected)]
            taken += 1
            answers, lens = [ids for ids, _ in encoded], tuple(n for _, n in encoded)
            yield RankedGroup(prompt_key(prompt), answers, [[0], [1]], answer_lens=lens)
