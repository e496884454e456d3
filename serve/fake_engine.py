"""A deterministic engine without a model, for unit tests and for trying the API without weights.

Candidate i answers with a fixed sentence that names i and echoes the user's last words, one token per step,
so that streaming, `n`, `max_tokens` and the stored token ids all behave as with a real engine. Asked for JSON, it
wraps that sentence in a JSON object (`{"answer": ...}`, whatever the schema: it has no grammar to follow one);
asked for alternatives, each token's are the next token ids, after the sampled one (-0.5) at -1.5, -2.5, ...
Each answer names the weights it was written with: the folder last loaded, or the adapter's version.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from serve.engine import AdapterRef, Alternatives, CandidateDelta, GenerationRequest


class FakeEngine:
    supports_json = True

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_model_len: int = 2048, step_s: float = 0.0, adapters: bool = True
    ) -> None:
        self.supports_adapters = adapters  # an answer with an adapter names the adapter's version, not the weights
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.step_s = step_s
        self.aborted: list[str] = []
        self.requests: list[GenerationRequest] = []
        self.alive = True
        self.running = 0
        self.weights: str | None = None  # the folder name last loaded; answers name it, to tell versions apart
        self.adapters: list[str] = []  # the versions whose adapters were loaded, in order
        self.load_s = 0.0

    def answer(self, index: int, request: GenerationRequest) -> list[int]:
        # The rendered prompt ends "...<user turn>\n<assistant header>\n": echo the user's turn.
        lines = str(self.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)).splitlines()
        turns = [line.strip() for line in lines if line.strip()]
        said = turns[-2] if len(turns) >= 2 else turns[-1]
        named = request.adapter.version if request.adapter is not None else self.weights
        source = f" from {named}" if named else ""
        text = f"answer {index}{source}: you said {said}"
        if request.json is not None:
            text = json.dumps({"answer": text})
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[list[CandidateDelta], None]:
        self.requests.append(request)
        answers = [self.answer(i, request) for i in range(request.n)]
        steps = max(len(a) for a in answers)
        self.running += 1
        try:
            for step in range(min(steps, request.max_tokens)):
                deltas = []
                for i, ids in enumerate(answers):
                    if step >= len(ids):
                        continue
                    last = step == len(ids) - 1 or step == request.max_tokens - 1
                    reason = None if not last else ("stop" if step == len(ids) - 1 else "length")
                    text = str(self.tokenizer.decode(ids[: step + 1]))[len(str(self.tokenizer.decode(ids[:step]))) :]
                    deltas.append(CandidateDelta(i, text, [ids[step]], [-0.5], reason, _top(ids[step], request)))
                await asyncio.sleep(self.step_s)
                yield deltas
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request.request_id)
            raise
        finally:
            self.running -= 1

    def unfinished(self) -> int:
        return self.running

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def healthy(self) -> bool:
        return self.alive

    async def load_weights(self, folder: Path) -> None:
        if self.running:
            raise RuntimeError("weights loaded while a generation was running")  # the swap protocol forbids it
        await asyncio.sleep(self.load_s)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}/config.json")
        self.weights = folder.name

    async def add_adapter(self, adapter: AdapterRef) -> None:
        await asyncio.sleep(self.load_s / 10)  # an adapter is a small fraction of the weights
        if not (adapter.folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter.folder}/adapter_config.json")
        self.adapters.append(adapter.version)

    async def shutdown(self) -> None:
        self.alive = False


def _top(token_id: int, request: GenerationRequest) -> list[Alternatives]:
    """The sampled token first (-0.5), then the ids after it, each a nat less likely than the one before."""
    if not request.top_logprobs:
        return []
    return [[(token_id, -0.5)] + [(token_id + j, -0.5 - j) for j in range(1, request.top_logprobs)]]
