"""A whole learning round, timed per phase, on the learner's device (issues 16 and 17): the reward-model round and
the PPO round the learner daemon runs once enough new rankings have arrived, with the default settings.

1. Rankings: v0001 answers each of `--rankings` prompts of rankloop's own prompt set (the training side, as
   simulated users ask) K=4 times, at temperature 1 and the server's default length limit; a scripted preference
   ranks each comparison as a simulated user does (lab.preferences.rank, noise 0.1); the ranking events go into a
   fresh feedback dataset, as the consumer writes them. The answers come from HF `generate` on the device (on a
   GPU machine without vLLM), or from vLLM in this process (`--answers vllm`, the served engine's way on a CPU).
   This part is not the round, and is timed apart.
2. The round, as the daemon calls it: `rm_round` with `learn.daemon.rm_options`, the reward-model gate, then
   `ppo_round` with `RoundConfig.from_settings` on the answers users ranked (served rollouts), evaluations and
   the publishing of the new version included. Every setting is the embedded default but the device.

    .venv/bin/python bench/round_speed.py [--device cuda] [--rankings 96] [--preference concise] [--source MODEL]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import bench_store  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from deploy.model_import import import_model  # noqa: E402
from deploy.model_store import ModelStore  # noqa: E402
from deploy.settings import Settings, load_settings  # noqa: E402
from feedback.dataset import Dataset  # noqa: E402
from feedback.events import Comparison, RankingEvent, StoredCandidate  # noqa: E402
from lab.preferences import load_scorer, rank  # noqa: E402
from learn.daemon import compute, rm_options  # noqa: E402
from learn.device import device_of  # noqa: E402
from learn.gate import rm_gate  # noqa: E402
from learn.ppo import Rollouts, answer_logprobs, pack, sample  # noqa: E402
from learn.ppo_run import RoundConfig  # noqa: E402
from learn.prompts import DEFAULT_PROMPTS, Prompt, key_of, prompts_from_file, split_prompts  # noqa: E402
from learn.rounds import PPOOptions, PPOResult, RMResult, ppo_round, rm_round  # noqa: E402
from learn.weights import load_causal_lm, pad_id  # noqa: E402

K, NOISE, BATCH = 4, 0.1, 64


def answers_hf(model: Any, tokenizer: Any, prompts: list[Prompt], max_tokens: int) -> Rollouts:
    """K answers to each prompt (in order) from `model` with HF generate, where the model is."""
    queries = [p.ids for p in prompts for _ in range(K)]
    eos, pad = int(tokenizer.eos_token_id), pad_id(tokenizer)
    found = [
        sample(model, queries[at : at + BATCH], max_tokens, eos, pad, seed=at) for at in range(0, len(queries), BATCH)
    ]
    return Rollouts(
        [q for r in found for q in r.queries],
        [a for r in found for a in r.responses],
        [t for r in found for t in r.truncated],
    )


def answers_vllm(folder: Path, prompts: list[Prompt], max_tokens: int) -> Rollouts:
    """K answers to each prompt from vLLM in this process, as the served engine writes them."""
    from serve.vllm_engine import configure_cpu_environment

    configure_cpu_environment(load_settings())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(folder), dtype="bfloat16", enforce_eager=True, max_model_len=2048, seed=0)
    params = SamplingParams(n=K, temperature=1.0, max_tokens=max_tokens)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p.ids) for p in prompts], params, use_tqdm=False)
    del llm
    queries, responses, truncated = [], [], []
    for prompt, out in zip(prompts, outputs, strict=True):
        for choice in out.outputs:
            queries.append(prompt.ids)
            responses.append(list(choice.token_ids))
            truncated.append(choice.finish_reason == "length")
    return Rollouts(queries, responses, truncated)


def ranking_events(
    model: Any, tokenizer: Any, prompts: list[Prompt], rollouts: Rollouts, preference: str
) -> list[tuple[str, str, str]]:
    """Ranking events of the comparisons (K answers a prompt, in order), ranked by `preference` as a simulated user
    does; a comparison whose answers all tie gives none. Log-probabilities are the writer's, as an engine reports."""
    scorer, rng = load_scorer(preference), random.Random(0)
    events = []
    for n, prompt in enumerate(prompts):
        rows = range(n * K, (n + 1) * K)
        chunk = Rollouts([rollouts.queries[r] for r in rows], [rollouts.responses[r] for r in rows], [False] * K)
        packed = pack(chunk, pad_id(tokenizer)).to(device_of(model))
        with torch.no_grad():
            logprobs = answer_logprobs(model, packed).cpu()
        texts = [str(tokenizer.decode(r, skip_special_tokens=True)) for r in chunk.responses]
        tiers = rank([scorer(prompt.messages[-1]["content"], t) for t in texts], NOISE, rng)
        if len(tiers) < 2:
            continue
        candidates = [
            StoredCandidate(
                index=k,
                text=texts[k],
                token_ids=chunk.responses[k],
                logprobs=logprobs[k, : len(chunk.responses[k])].tolist(),
                finish_reason="length" if rollouts.truncated[rows[k]] else "stop",
            )
            for k in range(K)
        ]
        comparison = Comparison(
            id=f"bench-{n}",
            messages=prompt.messages,
            prompt_token_ids=prompt.ids,
            candidates=candidates,
            policy_version="v0001",
            created=time.time(),
            sampling={"temperature": 1.0, "top_p": 1.0},
        )
        event = RankingEvent(ranking=tiers, user=f"sim-{n % 4}", created=time.time(), comparison=comparison)
        events.append((f"{1_000_000 + n}-0", "ranking", event.model_dump_json()))
    return events


def fresh_data_dir(root: Path, source: Path) -> Path:
    """A data folder with nothing but v0001 (a copy of the benchmarks' store's), so that every run starts alike."""
    if root.exists():
        shutil.rmtree(root)
    import_model(ModelStore(root / "models"), source)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="RANKLOOP_LEARN_DEVICE for the round (auto, cpu, cuda:N).")
    parser.add_argument("--rankings", type=int, default=96, help="Comparisons ranked before the round.")
    parser.add_argument("--preference", default="concise")
    parser.add_argument("--answers", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--source", type=Path, help="Model file or folder for v0001 (default: the bundled one).")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    work = fresh_data_dir(REPO / "var" / "bench-round", bench_store(args.data_dir, args.source).path("v0001"))
    settings = load_settings(data_dir=work, learn_device=args.device)
    device, bf16 = compute(settings)
    folder = work / "models" / "v0001"
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(folder, device=device)
    model.eval()
    train, _ = split_prompts(prompts_from_file(DEFAULT_PROMPTS, tokenizer, 384), key_of, 0.1)
    prompts = train[: args.rankings]
    rollouts = (
        answers_vllm(folder, prompts, settings.default_max_tokens)
        if args.answers == "vllm"
        else answers_hf(model, tokenizer, prompts, settings.default_max_tokens)
    )
    events = ranking_events(model, tokenizer, prompts, rollouts, args.preference)
    del model
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert(events)
    answering = time.perf_counter() - started
    print(f"{len(events)} rankings of {len(rollouts.responses)} answers in {answering:.1f} s", flush=True)
    rm = rm_round(settings, rm_options(settings, None), show_progress=False)
    verdict = rm_gate(rm.evaluation, settings.learn_min_rm_accuracy, settings.learn_min_rm_heldout_pairs)
    print(
        f"{rm.version}: {rm.evaluation.accuracy:.3f} on {rm.evaluation.pairs} pairs in {rm.seconds:.1f} s", flush=True
    )
    config = RoundConfig.from_settings(settings)
    result = ppo_round(
        settings,
        config,
        PPOOptions(bf16=bf16, device=device),
        show_progress=False,
        on_phase=lambda saying: print(saying, flush=True),
    )
    figures = {
        "answers": len(rollouts.responses),
        "truncated": sum(rollouts.truncated) / len(rollouts.truncated),
        "rankings": len(events),
        "answering_s": answering,
    }
    print(json.dumps({"rm_s": rm.seconds, **result.seconds, **figures}), flush=True)
    write_section(
        f"round_speed_{torch.device(device).type}",
        report(args, settings, device, bf16, rm, verdict.why, result, figures),
    )


def report(
    args: argparse.Namespace,
    settings: Settings,
    device: str,
    bf16: bool,
    rm: RMResult,
    gate: str,
    result: PPOResult,
    figures: dict[str, Any],
) -> str:
    phases = {"reward model": rm.seconds, **{k: v for k, v in result.seconds.items() if k != "done"}}
    total = sum(phases.values())
    iterations = result.card.details["iterations"]
    rows = "\n".join(f"| {name} | {seconds:.1f} | {seconds / total:.0%} |" for name, seconds in phases.items())
    answers = "HF generate on the device" if args.answers == "hf" else "vLLM in the benchmark's process"
    return f"""## A whole learning round on {torch.device(device).type.upper()} (issues 16 and 17)

- Date: {time.strftime("%Y-%m-%d")}; machine: {machine()}; torch {torch.__version__}; learner on {device}, bf16
  products {"on" if bf16 else "off"}; every other setting the embedded default.
- Command: `.venv/bin/python bench/round_speed.py --device {args.device} --rankings {args.rankings} --preference
  {args.preference} --answers {args.answers}`.
- Rankings: {figures["rankings"]} comparisons of K={K} answers by v0001 to prompts of rankloop's prompt set
  ({figures["answers"]} answers, {figures["truncated"]:.0%} cut at {settings.default_max_tokens} tokens; {answers},
  {figures["answering_s"]:.1f} s, not part of the round), ranked by `{args.preference}` with noise {NOISE}.
- Reward model {rm.version}: {rm.train_prompts} prompts trained on, held-out accuracy {rm.evaluation.accuracy:.3f}
  on {rm.evaluation.pairs} pairs ({gate}). PPO: {iterations} iterations on the ranked answers (served rollouts),
  from v0001 to {result.version}; agreement with held-out rankings {result.agreement.per_token:.0%} a token of
  {result.agreement.pairs} pairs; held-out mean reward {result.before.reward:.3f} -> {result.after.reward:.3f},
  answer length {result.before.answer_length:.0f} -> {result.after.answer_length:.0f} tokens, KL
  {result.after.kl:.2f}.

| phase | seconds | share |
|---|---|---|
{rows}
| **whole round** | **{total:.1f}** | 100% |
"""


if __name__ == "__main__":
    main()
