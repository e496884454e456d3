"""An engine on plain transformers `generate`: one request at a time in a worker thread, each candidate delivered
whole when it is done. For tiny models in tests of the whole loop, and to try rankloop where vLLM cannot run; the
vLLM engine is the one to serve users with (batching, paged KV cache: an order of magnitude more throughput).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import torch

from serve.engine import AdapterRef, Alternatives, CandidateDelta, EngineInputError, GenerationRequest


def _alternatives(scores: Any, row: int, length: int, top: int) -> list[Alternatives]:
    """The `top` most likely tokens at each of a row's first `length` steps, under the distribution it was sampled
    from (`generate`'s scores are the logits after temperature and top-p)."""
    if not top:
        return []
    best = [torch.log_softmax(step[row].float(), -1).topk(top) for step in scores[:length]]
    return [list(zip(b.indices.tolist(), b.values.tolist(), strict=True)) for b in best]


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


class HFEngine:
    supports_json = False
    supports_adapters = False  # every version is served from its merged weights

    def __init__(self, folder: Path, max_model_len: int) -> None:
        from transformers import AutoTokenizer, PreTrainedTokenizerBase

        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder)
        self.max_model_len = max_model_len
        self.model = _load(folder)
        self.running = 0
        self._lock = asyncio.Lock()  # one generation or weight load at a time

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[list[CandidateDelta], None]:
        if request.json is not None:
            raise EngineInputError("this server's engine cannot constrain answers to JSON; serve with vLLM for that")
        async with self._lock:
            self.running += 1
            try:
                deltas = await asyncio.to_thread(self._sample, request)
            finally:
                self.running -= 1
        yield deltas

    @torch.no_grad()
    def _sample(self, request: GenerationRequest) -> list[CandidateDelta]:
        if request.seed is not None:
            torch.manual_seed(request.seed)
        prompt = torch.tensor([request.prompt_token_ids] * request.n)
        eos = int(self.tokenizer.eos_token_id)
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
        out = self.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=request.max_tokens,
            eos_token_id=None if request.ignore_eos else eos,
            pad_token_id=eos,
            output_scores=True,
            return_dict_in_generate=True,
            **(sampling if request.temperature > 0 else {"do_sample": False}),
        )
        scores = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        deltas = []
        for index, row in enumerate(out.sequences[:, prompt.shape[1] :].tolist()):
            ended = not request.ignore_eos and eos in row
            ids = row[: row.index(eos) + 1] if ended else row  # the end-of-turn token kept, as vLLM reports it
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            logprobs = [float(x) for x in scores[index, : len(ids)]]
            top = _alternatives(out.scores, index, len(ids), request.top_logprobs)
            deltas.append(CandidateDelta(index, text, ids, logprobs, "stop" if ended else "length", top))
        return deltas

    async def abort(self, request_id: str) -> None:
        return None  # a generation in the worker thread runs to its end; its answer is then dropped

    def unfinished(self) -> int:
        return self.running

    async def healthy(self) -> bool:
        return True

    async def load_weights(self, folder: Path) -> None:
        async with self._lock:  # never between two steps of a generation
            self.model = await asyncio.to_thread(_load, folder)

    async def add_adapter(self, adapter: AdapterRef) -> None:
        raise NotImplementedError("the hf engine serves merged weights only")

    async def shutdown(self) -> None:
        return None
