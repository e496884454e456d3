"""PPO iteration speed on SmolLM2-135M: where an iteration's time goes (generation, scoring, forward/backward and
the rest), the share of time outside model compute, and the rollout path (HF `generate` in the learner, which PPO
uses) beside a vLLM engine in the learner process that would have to reload the weights after every update.

Model compute is measured, not inferred: forward hooks on the four models (generation's per-token forwards
included), the backward passes and the optimiser steps are timed; everything else is "outside model compute".

    .venv/bin/python bench/ppo_speed.py [--iterations 4] [--prompts 8] [--tokens 64] [--no-vllm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import bench_store  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from deploy.model_store import Card, ModelStore  # noqa: E402
from learn.ppo import PPOConfig, causal_parts  # noqa: E402
from learn.ppo_run import Models, PPORound, RoundConfig, load_models  # noqa: E402
from learn.prompts import Prompt, prompts_from_file  # noqa: E402
from learn.reward_model import _parts  # noqa: E402

MT_BENCH = REPO.parent / "shared" / "data" / "mt-bench-questions.jsonl"
THREADS = 2


class ComputeClock:
    """Wall time inside the models: forwards (via hooks), backward passes and optimiser steps."""

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
    from learn.reward_model import load_reward_model, save_reward_model

    rewards = ModelStore(root, prefix="r")
    if not rewards.versions():
        torch.manual_seed(0)
        model, tokenizer = load_reward_model(policy)
        save_reward_model(model, tokenizer, rewards, Card(version="r0001", parent="v0001", made_by="bench"), 0.0, "")
    return rewards.path("r0001")


def ppo_iterations(models: Models, prompts: list[Prompt], args: argparse.Namespace) -> list[dict[str, float]]:
    config = RoundConfig(iterations=args.iterations + 1, prompts_per_iteration=args.prompts,
                         max_new_tokens=args.tokens, ppo=PPOConfig(ptx_coef=0.0))  # fmt: skip
    trainer = PPORound(models, config, prompts)
    clock = ComputeClock()
    for module in (*causal_parts(models.policy), models.value, *_parts(models.reward.model)):
        clock.watch(module)  # the policy and the reward model are called through their parts
    if isinstance(models.reference, torch.nn.Module):  # with LoRA it is the policy itself, adapters off
        clock.watch(models.reference)
    trainer.optimizer.register_step_pre_hook(clock.enter)
    trainer.optimizer.register_step_post_hook(clock.leave)
    rows = []
    with clock.patched_backward():
        for n in range(config.iterations):
            clock.seconds = 0.0
            figures = trainer.step()
            figures["compute_s"] = clock.seconds
            print(
                f"iteration {n}: {figures['iteration_s']:.1f} s, generation {figures['generate_s']:.1f} s "
                f"({figures['generate_tokens_per_s']:.0f} tok/s), model compute {clock.seconds:.1f} s",
                flush=True,
            )
            if n:  # the first iteration warms caches up
                rows.append(figures)
    return rows


def vllm_rollouts(
    policy_dir: Path, models: Models, prompts: list[Prompt], args: argparse.Namespace
) -> dict[str, float]:
    """The same rollouts from a vLLM engine in this process, plus what reloading the updated weights costs."""
    from deploy.settings import load_settings
    from learn.sft import save_policy
    from serve.vllm_engine import configure_cpu_environment

    configure_cpu_environment(load_settings())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(policy_dir), dtype="bfloat16", enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=False, seed=0)  # fmt: skip
    batches = [prompts[i * args.prompts : (i + 1) * args.prompts] for i in range(args.iterations)]
    params = SamplingParams(temperature=1.0, top_k=0, max_tokens=args.tokens, seed=0)
    llm.generate([TokensPrompt(prompt_token_ids=p.ids) for p in batches[0]], params, use_tqdm=False)  # warm-up
    tokens, generate_s, reload_s = 0, 0.0, 0.0
    store = ModelStore(Path(tempfile.mkdtemp(prefix="ppo-reload-")))
    merged = models.policy.merge_and_unload() if hasattr(models.policy, "merge_and_unload") else models.policy
    for n, batch in enumerate(batches):
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p.ids) for p in batch], params, use_tqdm=False)
        generate_s += time.perf_counter() - started
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        started = time.perf_counter()  # after each PPO update: write the policy, the engine reloads it
        folder = save_policy(_copy(merged), models.tokenizer, store, Card(version=f"v{n + 1:04d}", parent=None,
                                                                           made_by="bench"))  # fmt: skip
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        llm.reset_prefix_cache()
        reload_s += time.perf_counter() - started
    return {"tokens_per_s": tokens / generate_s, "reload_s": reload_s / len(batches),
            "with_reload_tokens_per_s": tokens / (generate_s + reload_s), "tokens": tokens / len(batches)}  # fmt: skip


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)  # save_policy casts to bf16 in place; the learner keeps training in fp32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4, help="Measured iterations (one more warms up).")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    if not MT_BENCH.is_file():
        sys.exit(f"skipped: {MT_BENCH} is absent")
    torch.set_num_threads(THREADS)
    store = bench_store(args.data_dir)
    policy_dir = store.path("v0001")
    torch.manual_seed(0)
    models = load_models(policy_dir, policy_dir, reward_folder(policy_dir, args.data_dir / "bench-reward"), True)
    prompts = prompts_from_file(MT_BENCH, models.tokenizer, 256)
    rows = ppo_iterations(models, prompts, args)
    other = vllm_rollouts(policy_dir, models, prompts, args) if not args.no_vllm else None
    write_section("ppo_speed", report(rows, other, args))


def report(rows: list[dict[str, float]], other: dict[str, float] | None, args: argparse.Namespace) -> str:
    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in rows)

    total, compute = mean("iteration_s"), mean("compute_s")
    hf = mean("generate_tokens_per_s")
    lines = [
        "## PPO iteration speed (issue 6)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; {THREADS} threads.",
        f"- Command: `.venv/bin/python bench/ppo_speed.py --iterations {args.iterations} --prompts {args.prompts} "
        f"--tokens {args.tokens}`.",
        f"- SmolLM2-135M policy with LoRA adapters (r 16, fp32), value model and reward model on the same backbone, "
        f"reference = policy with adapters off; {args.prompts} MT-bench prompts x 1 answer x up to {args.tokens} "
        f"new tokens ({mean('rollout_tokens'):.0f} generated on average), 4 PPO epochs of mini-batches of 4; "
        f"mean of {len(rows)} iterations after one warm-up.",
        "",
        "| part | seconds per iteration | share |",
        "|---|---|---|",
    ]
    for label, key in (("generation (HF generate)", "generate_s"), ("scoring (policy, reference, value, reward "
                       "forwards; rewards, GAE)", "score_s"), ("update (forward/backward, optimiser)", "update_s"),
                       ("rest", "other_s")):  # fmt: skip
        lines.append(f"| {label} | {mean(key):.2f} | {mean(key) / total:.0%} |")
    lines += [
        f"| **iteration** | **{total:.2f}** | |",
        "",
        f"Time outside model compute (forwards, backward passes, optimiser steps timed directly): "
        f"{total - compute:.2f} s of {total:.2f} s = **{(total - compute) / total:.1%}** (target <= 10%).",
        "",
    ]
    if other is not None:
        lines += [
            "| rollout path | tokens/s | ratio |",
            "|---|---|---|",
            f"| HF generate in the learner (fp32, batch of {args.prompts}; used) | {hf:.1f} | 1.00x |",
            f"| vLLM in the learner process (bf16), generation only | {other['tokens_per_s']:.1f} | "
            f"{other['tokens_per_s'] / hf:.2f}x |",
            f"| vLLM, with writing and reloading the weights after each update ({other['reload_s']:.1f} s) | "
            f"{other['with_reload_tokens_per_s']:.1f} | {other['with_reload_tokens_per_s'] / hf:.2f}x |",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
