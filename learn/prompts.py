"""Prompts for PPO rollouts and for evaluation: users' real prompts from the feedback dataset, plus prompt files.

A prompt from the dataset keeps the token ids the server rendered, so the policy continues exactly what users saw
answered. A prompt from a file is rendered with the policy's chat template. The held-out prompts are the evaluation
split (learn.rm_data.is_held_out), which simulated users keep out of too: policies are judged on them, never
trained on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from feedback.events import RankingEvent, StoredCandidate
from learn.data import DataError, read_jsonl
from learn.rm_data import is_held_out, prompt_key

T = TypeVar("T")
# The prompts rankloop ships (a few hundred of the kinds people ask a chat model, written for this project): what
# simulated users ask and versions are judged on when no prompt file is given; their held-out split is the
# learner's (`is_held_out`).
DEFAULT_PROMPTS = Path(__file__).with_name("default_prompts.jsonl")


@dataclass(frozen=True)
class Prompt:
    key: str  # learn.rm_data.prompt_key of the messages
    messages: list[dict[str, str]]
    ids: list[int]  # rendered, ending with the assistant header


@dataclass(frozen=True)
class Served:
    """The K answers a served version wrote to one prompt, from a comparison users ranked: rollouts that cost
    nothing to generate (PPO weights them from the version that wrote them, `policy_version`)."""

    comparison_id: str
    key: str  # learn.rm_data.prompt_key of the messages
    prompt_ids: list[int]
    answers: list[list[int]]
    truncated: list[bool]  # cut by the length limit
    policy_version: str


def render(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def messages_of(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation to answer, from the shapes prompt files come in (chat, Alpaca, MT-bench, plain)."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages: list[dict[str, str]] = row["messages"]
        return messages[:-1] if messages[-1].get("role") == "assistant" else messages
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    if isinstance(row.get("instruction"), str):
        extra = row.get("input") or (row.get("instances") or [{}])[0].get("input")
        return [{"role": "user", "content": row["instruction"] + (f"\n\n{extra}" if extra else "")}]
    if isinstance(row.get("turns"), list) and row["turns"]:
        return [{"role": "user", "content": str(row["turns"][0])}]
    raise DataError(f"{where}: expected `messages`, `prompt`, `instruction` or `turns`; got keys {sorted(row)}")


def conversations(path: Path) -> Iterator[list[dict[str, str]]]:
    """The conversation to answer on each line of a JSONL prompt file."""
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    for n, row in enumerate(read_jsonl(path), start=1):
        yield messages_of(row, f"{path}, line {n}")


def prompts_from_file(path: Path, tokenizer: Any, max_len: int) -> list[Prompt]:
    """A JSONL file of prompts; prompts longer than `max_len` tokens are left out (they leave no room to answer)."""
    prompts = []
    for messages in conversations(path):
        ids = render(tokenizer, messages)
        if len(ids) <= max_len:
            prompts.append(Prompt(prompt_key(messages), messages, ids))
    return prompts


def prompts_from_events(events: Iterable[RankingEvent], max_len: int) -> list[Prompt]:
    """The prompts of ranking events, as the server rendered them."""
    prompts = []
    for event in events:
        comparison = event.comparison
        if len(comparison.prompt_token_ids) <= max_len:
            prompts.append(
                Prompt(prompt_key(comparison.messages), comparison.messages, list(comparison.prompt_token_ids))
            )
    return prompts


def _plain(sampling: dict[str, Any]) -> bool:
    """Sampled from the version's own distribution, unchanged."""
    changed = (
        sampling.get("temperature", 1.0) != 1.0,
        sampling.get("top_p", 1.0) != 1.0,
        sampling.get("presence_penalty", 0.0) != 0.0,
        sampling.get("frequency_penalty", 0.0) != 0.0,
        bool(sampling.get("json", False)),
    )
    return not any(changed)


def served_from_events(events: Iterable[RankingEvent], max_prompt_len: int) -> list[Served]:
    """Each ranked comparison once (several users may rank one), split by the version that wrote each answer (a
    canary's comparison holds two), prompts longer than `max_prompt_len` left out, and
    those sampled at another temperature or top_p than 1, with penalties or constrained to JSON: PPO's weights are
    taken from the version's plain distribution, of which such answers are not samples (their ratios would be
    biased)."""
    seen: set[str] = set()
    served = []
    for event in events:
        comparison = event.comparison
        if comparison.id in seen or len(comparison.prompt_token_ids) > max_prompt_len:
            continue
        sampling = comparison.sampling  # empty in events stored before sampling was kept: the defaults
        if not _plain(sampling):
            continue
        seen.add(comparison.id)
        # A canary's comparison holds two versions' answers: each version's are rollouts of that version alone.
        writers: dict[str, list[StoredCandidate]] = {}
        for c in comparison.candidates:
            if c.token_ids:
                writers.setdefault(c.policy_version or comparison.policy_version, []).append(c)
        served += [
            Served(
                comparison.id,
                prompt_key(comparison.messages),
                list(comparison.prompt_token_ids),
                [list(c.token_ids) for c in candidates],
                [c.finish_reason == "length" for c in candidates],
                writer,
            )
            for writer, candidates in writers.items()
        ]
    return served


def unique(prompts: Iterable[T], key: Callable[[T], str]) -> list[T]:
    """First occurrence of each prompt, order kept: a prompt ranked ten times is still one prompt."""
    seen: set[str] = set()
    kept = []
    for prompt in prompts:
        if key(prompt) not in seen:
            seen.add(key(prompt))
            kept.append(prompt)
    return kept


def split_prompts(prompts: Iterable[T], key: Callable[[T], str], fraction: float) -> tuple[list[T], list[T]]:
    """(train, held out): the held-out ones are the evaluation prompts (learn.rm_data.is_held_out of their key)."""
    train: list[T] = []
    held: list[T] = []
    for prompt in prompts:
        (held if is_held_out(key(prompt), fraction) else train).append(prompt)
    return train, held


def key_of(prompt: Prompt) -> str:
    return prompt.key
