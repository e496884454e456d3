"""Prompts for PPO rollouts and for evaluation: users' real prompts from the feedback dataset, plus prompt files.

A prompt from the dataset keeps the token ids the server rendered, so the policy continues exactly what users saw
answered. A prompt from a file is rendered with the policy's chat template. The held-out prompts are the evaluation
split (learn.rm_data.is_held_out), which simulated users keep out of too: policies are judged on them, never
trained on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learn.data import DataError, read_jsonl
from learn.rm_data import is_held_out, prompt_key


@dataclass(frozen=True)
class Prompt:
    key: str  # learn.rm_data.prompt_key of the messages
    messages: list[dict[str, str]]
    ids: list[int]  # rendered, ending with the assistant header


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


def prompts_from_file(path: Path, tokenizer: Any, max_len: int) -> list[Prompt]:
    """A JSONL file of prompts; prompts longer than `max_len` tokens are left out (they leave no room to answer)."""
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    prompts = []
    for n, row in enumerate(read_jsonl(path), start=1):
        messages = messages_of(row, f"{path}, line {n}")
        ids = render(tokenizer, messages)
        if len(ids) <= max_len:
            prompts.append(Prompt(prompt_key(messages), messages, ids))
    return prompts


def prompts_from_events(events: Iterable[dict[str, Any]], max_len: int) -> list[Prompt]:
    """The prompts of ranking events, as the server rendered them."""
    prompts = []
    for data in events:
        comparison = data["comparison"]
        ids = list(comparison["prompt_token_ids"])
        if len(ids) <= max_len:
            prompts.append(Prompt(prompt_key(comparison["messages"]), comparison["messages"], ids))
    return prompts


def unique(prompts: Iterable[Prompt]) -> list[Prompt]:
    """First occurrence of each prompt, order kept: a prompt ranked ten times is still one prompt."""
    seen: set[str] = set()
    kept = []
    for prompt in prompts:
        if prompt.key not in seen:
            seen.add(prompt.key)
            kept.append(prompt)
    return kept


def split_prompts(prompts: list[Prompt], fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held out), by the reward model's split of the same prompt keys."""
    held = [p for p in prompts if is_held_out(p.key, fraction)]
    return [p for p in prompts if not is_held_out(p.key, fraction)], held
