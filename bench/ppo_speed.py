"""PPO iteration speed on SmolLM2-135M: where an iteration's time goes (generation, scoring, forward/backward and
the rest) and the share of time outside model compute, for three ways of running an iteration on the same prompts:

- `sampled, whole`: answers sampled in the learner with HF `generate`, every layer's LoRA adapters trained, every
  pass through the whole model (the PPO of rankloop before served rollouts and the split forward);
- `sampled, split`: the same answers, adapters on the upper 6 layers only, the lower layers' output computed once
  per batch (learn.layers);
- `served, split` (the default): no generation; the rollouts are K=4 answers per prompt that the served version
  wrote (as users' ranked comparisons hold them; here sampled once before timing), the ratio taken against it.

Model compute is measured, not inferred: forward hooks on the models (generation's per-token forwards included),
the backward passes and the optimiser steps are timed (on a GPU, to the GPU's finish); everything else is "outside
model compute".

On a GPU (`--device cuda`), the served answers are sampled with HF `generate` on the GPU where vLLM is not
installed (they are sampled once, before timing, and cost the iterations nothing either way).

    .venv/bin/python bench/ppo_speed.py [--iterations 3] [--warmup 1] [--prompts 8] [--tokens 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import bench_store  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from deploy.model_store import Card, ModelStore  # noqa: E402
from learn.device import device_of, learn_device  # noqa: E402
from learn.ppo import Models, PPOConfig, causal_parts, sample  # noqa: E402
from learn.ppo_run import PPORound, RoundConfig, load_models  # noqa: E402
from learn.precision import autocast, use_bf16  # noqa: E402
from learn.prompts import Prompt, Served, prompts_from_file  # noqa: E402
from learn.reward_model import _parts  # noqa: E402
from learn.weights import pad_id  # noqa: E402

MT_BENCH = REPO.parent / "shared" / "data" / "mt-bench-questions.jsonl"
THREADS = 2


class ComputeClock:
    """Wall time inside the models on a CPU: forwards (via hooks), backward passes and optimiser steps. Not used on
    a GPU, where a model call returns once its kernels are queued: timing it would mean waiting for the GPU at every
    call, which measured an iteration at twice its length (2.1 s against the 0.9 s of the same iteration
    unwatched)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._since = 0.0

    def enter(self, *_: Any) -> None:
        if self._depth == 0:
            self._since = time.perf_counter()
        self._depth += 1

    def leave(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._since

    def watch(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.leave)

    @contextmanager
    def patched_backward(self) -> Iterator[None]:
        original = torch.Tensor.backward

        def timed(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            self.enter()
            try:
                original(tensor, *args, **kwargs)
            finally:
                self.leave()

        torch.Tensor.backward = timed  # type: ignore[method-assign]
        try:
            yield
        finally:
            torch.Tensor.backward = original  # type: ignore[method-assign]


def reward_folder(policy: Path, root: Path) -> Path:
    """A reward model on the policy's backbone (a random head: speed does not depend on what it learned)."""
    from learn.reward_model import Norm, load_reward_model, save_reward_model

    rewards = ModelStore(root, prefix="r")
    if not rewards.versions():
        torch.manual_seed(0)
        model, tokenizer = load_reward_model(policy)
        save_reward_model(
            model, tokenizer, rewards, Card(version="r0001", parent="v0001", made_by="bench"), Norm(0.0, 0.0, "")
        )
    return rewards.path("r0001")


@dataclass(frozen=True)
class Way:
    name: str
    rollouts: str
    train_layers: int


WAYS = (Way("sampled, whole", "sampled", 0), Way("sampled, split", "sampled", 6), Way("served, split", "served", 6))


def ppo_iterations(
    models: Models, config: RoundConfig, prompts: list[Prompt], served: list[Served], warmup: int = 1
) -> list[dict[str, float]]:
    trainer = PPORound(models, config, prompts, served=served)
    clock, watched = ComputeClock(), trainer.device.type == "cpu"
    if watched:
        for module in (*causal_parts(models.policy), models.value, *_parts(models.scorer.model)):
            clock.watch(module)  # the policy and the reward model are called through their parts
        if isinstance(models.reference, torch.nn.Module):  # with LoRA it is the policy itself, adapters off
            clock.watch(models.reference)
        trainer.optimizer.register_step_pre_hook(clock.enter)
        trainer.optimizer.register_step_post_hook(clock.leave)
    rows = []
    with clock.patched_backward() if watched else nullcontext():
        for n in range(config.iterations):
            clock.seconds = 0.0
            figures = trainer.step()  # ends reading its figures, so the GPU has finished the iteration's work
            figures["compute_s"] = clock.seconds if watched else float("nan")
            print(
                f"iteration {n}: {figures['iteration_s']:.1f} s, generation {figures['generate_s']:.1f} s, "
                f"{figures['rollout_tokens']:.0f} rollout tokens, model compute {clock.seconds:.1f} s",
                flush=True,
            )
            if n >= warmup:  # the first iterations warm caches up (on a GPU: kernels for each new batch shape)
                rows.append(figures)
    return rows


def served_answers(policy_dir: Path, prompts: list[Prompt], args: argparse.Namespace, models: Models) -> list[Served]:
    """K=4 answers per prompt from v0001, as a served comparison holds them: sampled once with vLLM (or, on a GPU
    machine without vLLM, with HF generate there), not timed."""
    import gc

    if device_of(models.policy).type == "cuda" and importlib.util.find_spec("vllm") is None:
        return served_by_generate(prompts, args, models)

    from deploy.settings import load_settings
    from serve.vllm_engine import configure_cpu_environment

    configure_cpu_environment(load_settings())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(policy_dir), dtype="bfloat16", enforce_eager=True, max_model_len=2048, seed=0)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=args.tokens)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p.ids) for p in prompts], params, use_tqdm=False)
    del llm
    gc.collect()
    return [
        Served(
            f"c{n}",
            p.key,
            p.ids,
            [list(c.token_ids) for c in out.outputs],
            [c.finish_reason == "length" for c in out.outputs],
            "v0001",
        )
        for n, (p, out) in enumerate(zip(prompts, outputs, strict=True))
    ]


def served_by_generate(prompts: list[Prompt], args: argparse.Namespace, models: Models) -> list[Served]:
    """The same K=4 answers per prompt, from HF generate with the policy's adapters off (v0001 itself)."""
    eos, pad = int(models.tokenizer.eos_token_id), pad_id(models.tokenizer)
    with models.policy.disable_adapter():
        made = sample(models.policy, [p.ids for p in prompts for _ in range(4)], args.tokens, eos, pad, seed=0)
    return [
        Served(f"c{n}", p.key, p.ids, made.responses[4 * n : 4 * n + 4], made.truncated[4 * n : 4 * n + 4], "v0001")
        for n, p in enumerate(prompts)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="Measured iterations.")
    parser.add_argument("--warmup", type=int, default=1, help="Iterations before them, not measured (3 on a GPU).")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    parser.add_argument("--device", default="cpu", help="Where the iterations run: cpu, cuda or cuda:N.")
    parser.add_argument("--prompt-file", type=Path, default=MT_BENCH)
    parser.add_argument("--source", type=Path, help="Model file or folder for v0001 (default: the bundled one).")
    args = parser.parse_args()
    if not args.prompt_file.is_file():
        sys.exit(f"skipped: {args.prompt_file} is absent")
    device = learn_device(args.device)
    bf16 = use_bf16(None, device)
    torch.set_num_threads(THREADS)
    store = bench_store(args.data_dir, args.source)
    policy_dir = store.path("v0001")
    reward = reward_folder(policy_dir, args.data_dir / "bench-reward")
    results: dict[str, list[dict[str, float]]] = {}
    prompts: list[Prompt] = []
    served: list[Served] = []
    for way in WAYS:
        config = RoundConfig(
            iterations=args.iterations + args.warmup,
            prompts_per_iteration=args.prompts,
            max_new_tokens=args.tokens,
            train_layers=way.train_layers,
            rollouts=way.rollouts,
            ppo=PPOConfig(ptx_coef=0.0, epochs=2, minibatch=8),
        )  # type: ignore[arg-type]
        torch.manual_seed(0)
        writer = policy_dir if way.rollouts == "served" else None
        models = load_models(policy_dir, policy_dir, reward, config, writer, device)
        if not prompts:
            prompts = prompts_from_file(args.prompt_file, models.tokenizer, 256)[
                : args.prompts * (args.iterations + args.warmup)
            ]
        if way.rollouts == "served" and not served:
            served = served_answers(policy_dir, prompts, args, models)
        print(f"{way.name}:", flush=True)
        with autocast(bf16, device):
            results[way.name] = ppo_iterations(
                models, config, prompts, served if way.rollouts == "served" else [], args.warmup
            )
    section = "ppo_speed" if device.type == "cpu" else f"ppo_speed_{device.type}"
    write_section(section, report(results, args, device, bf16))


def report(
    results: dict[str, list[dict[str, float]]], args: argparse.Namespace, device: torch.device, bf16: bool
) -> str:
    def mean(way: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[way])

    base = WAYS[0].name
    gpu_answers = device.type == "cuda" and importlib.util.find_spec("vllm") is None
    lines = [
        f"## PPO iteration speed on {device.type.upper()} (issues 6, 16 and 17)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; torch {torch.__version__}; "
        f"{device if device.type != 'cpu' else f'{THREADS} CPU threads'}; bf16 products {'on' if bf16 else 'off'} "
        "(the device's default).",
        f"- Command: `.venv/bin/python bench/ppo_speed.py --iterations {args.iterations} --warmup {args.warmup} "
        f"--prompts {args.prompts} "
        f"--tokens {args.tokens}{'' if device.type == 'cpu' else f' --device {args.device}'}`.",
        f"- SmolLM2-135M policy with LoRA adapters (r 16), reference = policy with adapters off, reward model on "
        f"v0001's backbone, value head on its features; {args.prompts} MT-bench prompts an iteration, up to "
        f"{args.tokens} answer tokens, 2 PPO epochs of mini-batches of 8; mean of {args.iterations} iterations "
        f"after {args.warmup} not measured. `sampled`: one answer a prompt, generated in the iteration; `served`: "
        "the K=4 answers a served version wrote to each prompt, as users' ranked comparisons hold them"
        + (
            " (here sampled with HF generate on the GPU: vLLM is not installed on this machine)."
            if gpu_answers
            else "."
        )
        + (" Model compute is timed on a CPU only (see ComputeClock)." if device.type == "cuda" else ""),
        "",
        "| way | rollouts (tokens) | generation s | scoring s | update s | rest s | iteration s | outside model "
        "compute | s per 1000 rollout tokens | vs sampled, whole |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_k = {w: mean(w, "iteration_s") / mean(w, "rollout_tokens") * 1000 for w in results}
    for way in results:
        total, compute = mean(way, "iteration_s"), mean(way, "compute_s")
        outside = "n/a" if math.isnan(compute) else f"{(total - compute) / total:.1%}"
        lines.append(
            f"| {way} | {mean(way, 'rollout_tokens'):.0f} | {mean(way, 'generate_s'):.1f} | "
            f"{mean(way, 'score_s'):.2f} | {mean(way, 'update_s'):.2f} | {mean(way, 'other_s'):.2f} | "
            f"{total:.2f} | {outside} | {per_k[way]:.2f} | {per_k[base] / per_k[way]:.2f}x |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
