"""Version A against version B on held-out prompts under a preference: the same prompts for both, M answers per
prompt, each pair judged by the preference's scorer (ties count half).

Answers are sampled with vLLM in this process where it is installed (about 20x HF `generate` on 2 CPU cores at
256 tokens), else with HF `generate` (the same sampling seeds for both versions then; vLLM's CPU backend takes an
engine seed only, so its pairs are of independent samples). The result is kept under data_dir/evals/ for
`rankloop report`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lab.preferences import Scorer
from learn.ppo import sample
from learn.prompts import render
from learn.weights import load_causal_lm, pad_id
from learn.winrate import WinRate, outcome, win_rate

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Judgement:
    a: str
    b: str
    preference: str
    win_rate: WinRate
    length_a: float  # mean answer length in characters
    length_b: float
    prompts: int
    samples_per_prompt: int
    seed: int
    created: float
    examples: list[dict[str, str]]  # prompt, A's answer, B's answer

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def read(cls, path: Path) -> Judgement:
        raw: dict[str, Any] = json.loads(path.read_text())
        raw["win_rate"] = WinRate(**raw["win_rate"])
        return cls(**raw)


Engine = Literal["auto", "vllm", "hf"]


def answers(
    folder: Path, prompts: Sequence[Messages], per_prompt: int, max_new_tokens: int, seed: int, engine: Engine = "auto"
) -> list[str]:
    """`per_prompt` sampled answers (temperature 1) to each prompt from the policy at `folder`: prompt-major."""
    if engine == "vllm" or (engine == "auto" and importlib.util.find_spec("vllm") is not None):
        return vllm_answers(folder, prompts, per_prompt, max_new_tokens, seed)
    return hf_answers(folder, prompts, per_prompt, max_new_tokens, seed)


def vllm_answers(
    folder: Path, prompts: Sequence[Messages], per_prompt: int, max_new_tokens: int, seed: int
) -> list[str]:
    import gc

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    gpu = torch.cuda.is_available()
    if not gpu:  # as the server runs it (serve/vllm_engine.py): every core, a small KV cache
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = LLM(str(folder), dtype="bfloat16", enforce_eager=not gpu, max_model_len=2048, seed=seed)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=render(tokenizer, p)) for p in prompts],
            SamplingParams(n=per_prompt, temperature=1.0, max_tokens=max_new_tokens),
            use_tqdm=False,
        )
        return [c.text for output in outputs for c in output.outputs]
    finally:
        del llm  # the engine's processes stop with it, before the next version's engine starts
        gc.collect()


@torch.no_grad()
def hf_answers(
    folder: Path, prompts: Sequence[Messages], per_prompt: int, max_new_tokens: int, seed: int, batch: int = 8
) -> list[str]:
    model, tokenizer = load_causal_lm(folder)
    model.eval()
    queries = [render(tokenizer, p) for p in prompts for _ in range(per_prompt)]
    texts: list[str] = []
    for start in range(0, len(queries), batch):
        rollouts = sample(
            model,
            queries[start : start + batch],
            max_new_tokens,
            int(tokenizer.eos_token_id),
            pad_id(tokenizer),
            seed=seed + start,
        )
        texts += [str(tokenizer.decode(r, skip_special_tokens=True)) for r in rollouts.responses]
    return texts


def compare(
    folder_a: Path,
    folder_b: Path,
    names: tuple[str, str],
    preference: str,
    scorer: Scorer,
    prompts: Sequence[Messages],
    per_prompt: int = 4,
    max_new_tokens: int = 256,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    engine: Engine = "auto",
) -> Judgement:
    said = progress or (lambda _: None)
    said(f"sampling {len(prompts)} x {per_prompt} answers from {names[0]}")
    of_a = answers(folder_a, prompts, per_prompt, max_new_tokens, seed, engine)
    said(f"sampling {len(prompts)} x {per_prompt} answers from {names[1]}")
    of_b = answers(folder_b, prompts, per_prompt, max_new_tokens, seed, engine)
    asked = [p[-1]["content"] for p in prompts for _ in range(per_prompt)]
    outcomes = [outcome(scorer(q, x), scorer(q, y)) for q, x, y in zip(asked, of_a, of_b, strict=True)]
    examples = [{"prompt": asked[i], "a": of_a[i], "b": of_b[i]} for i in range(0, len(asked), per_prompt)][:6]
    return Judgement(
        names[0],
        names[1],
        preference,
        win_rate(outcomes),
        sum(map(len, of_a)) / len(of_a),
        sum(map(len, of_b)) / len(of_b),
        len(prompts),
        per_prompt,
        seed,
        time.time(),
        examples,
    )


def save(comparison: Judgement, data_dir: Path) -> Path:
    folder = data_dir / "evals"
    folder.mkdir(parents=True, exist_ok=True)
    name = comparison.preference.replace(":", "_").replace("/", "_")
    path = folder / f"{comparison.a}-vs-{comparison.b}-{name}.json"
    path.write_text(comparison.to_json())
    return path
