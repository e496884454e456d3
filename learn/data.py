"""Training examples for language-model losses: demonstrations (SFT) and plain text (continued pre-training, ptx).

An example is token ids plus labels; a label of -100 is not trained on. For a demonstration only the answer (and
the end-of-turn tokens the chat template puts after it) is trained on; the prompt is context. For plain text every
token is trained on. Both go through the same training loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

IGNORE = -100


@dataclass(frozen=True)
class Demonstration:
    messages: list[dict[str, str]]  # the conversation up to the user's turn
    answer: str  # the ideal assistant answer


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


class DataError(ValueError):
    """Input that cannot become training examples; the message says which row and why."""


def by_length(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices of `lengths` in groups of `size` of similar length, shortest first: a pass over a group padded to its
    own longest does less padded work than one over all of them."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


def right_pad(sequences: Sequence[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """(ids, attention mask), each (N, longest): every sequence left-aligned, `pad` after it."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def encode_demonstration(tokenizer: Any, demo: Demonstration, max_len: int) -> Example:
    """Chat template applied; labels IGNORE over the prompt, the answer's ids over the answer; cut at max_len."""
    prompt = str(tokenizer.apply_chat_template(demo.messages, tokenize=False, add_generation_prompt=True))
    full = str(
        tokenizer.apply_chat_template([*demo.messages, {"role": "assistant", "content": demo.answer}], tokenize=False)
    )
    if not full.startswith(prompt):
        raise DataError("the chat template renders the prompt differently once an answer follows it")
    # Encode the two parts separately: tokenizing the whole text could merge tokens across the boundary and
    # blur which tokens are the answer's.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_len]
    return Example(ids, labels)


def encode_text(tokenizer: Any, text: str, max_len: int) -> list[Example]:
    """Plain text, every token a target, cut into pieces of at most max_len tokens, each ending the text with EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return [Example(ids[i : i + max_len], ids[i : i + max_len]) for i in range(0, len(ids), max_len) if ids[i:]]


def demonstrations_from_rows(rows: Iterable[dict[str, Any]], source: str) -> Iterator[Demonstration]:
    """Rows in any of the shapes rankloop meets, each to one demonstration or more:

    - `{"messages": [...], "answer": "..."}` (feedback events, rankloop's own export);
    - `{"messages": [..., {"role": "assistant", ...}]}` (TRL's conversational SFT form);
    - `{"instruction", "input"?, "output"}` (Alpaca), and `{"instruction", "instances": [{"input", "output"}]}`
      (the Alpaca seed tasks).
    """
    for n, row in enumerate(rows, start=1):
        if "answer" in row and "messages" in row:
            yield Demonstration(row["messages"], row["answer"])
        elif "messages" in row and row["messages"] and row["messages"][-1].get("role") == "assistant":
            yield Demonstration(row["messages"][:-1], row["messages"][-1]["content"])
        elif "instruction" in row and ("output" in row or "instances" in row):
            for instance in row.get("instances") or [row]:
                prompt = row["instruction"] + (f"\n\n{instance['input']}" if instance.get("input") else "")
                yield Demonstration([{"role": "user", "content": prompt}], instance["output"])
        else:
            raise DataError(
                f"{source}, row {n}: expected messages+answer, messages ending with an assistant "
                f"turn, or an Alpaca instruction/output; got keys {sorted(row)}"
            )


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {n}: not JSON ({exc.msg})") from exc


def read_texts(path: Path) -> list[str]:
    """Plain text for LM loss: a .jsonl of {"text"} rows (or demonstrations, rendered), or any text file."""
    if path.suffix == ".jsonl":
        texts = []
        for row in read_jsonl(path):
            if "text" in row:
                texts.append(row["text"])
            else:
                texts += [
                    f"{d.messages[-1]['content']}\n\n{d.answer}" for d in demonstrations_from_rows([row], str(path))
                ]
        return texts
    return [part for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()]
