"""What the ptx term costs a PPO iteration, by how many pre-training examples each optimiser step reads.

A round's PPO iteration as the learner runs it by default (served rollouts: K=4 answers to each of 8 prompts, the
upper 6 layers' adapters trained, 2 epochs of mini-batches of 4: 16 optimiser steps), with the ptx texts a round
takes by default, the reference's own answers to users' prompts (here: v0001's answers to the iterations' prompts).
The ways differ only in the ptx term:

- `no ptx`: ptx_coef 0, the cost of the rest;
- `4 a step, the same 4`: four examples at every step of an iteration (the learner's default until 2026-12-06);
- `1 a step, 4 an iteration`: four examples an iteration, one a step in turn (the default since);
- `1 a step, its own`: sixteen examples an iteration, each step its own.

    .venv/bin/python bench/ptx_cost.py [--iterations 2] [--warmup 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import bench_store  # noqa: E402
from bench.ppo_speed import MT_BENCH, THREADS, reward_folder, served_answers  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from learn.data import Example  # noqa: E402
from learn.device import learn_device  # noqa: E402
from learn.ppo import PPOConfig  # noqa: E402
from learn.ppo_run import PPORound, RoundConfig, load_models  # noqa: E402
from learn.precision import autocast, use_bf16  # noqa: E402
from learn.prompts import Served, prompts_from_file  # noqa: E402
from learn.sources import reference_answers  # noqa: E402

PTX_MAX_LEN = 512  # as a round cuts its ptx texts (learn.rounds)


@dataclass(frozen=True)
class Way:
    name: str
    coef: float
    batch: int
    pool: int | None


WAYS = (
    Way("no ptx", 0.0, 1, 4),
    Way("4 a step, the same 4", 0.5, 4, 4),
    Way("1 a step, 4 an iteration", 0.5, 1, 4),
    Way("1 a step, its own", 0.5, 1, None),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2, help="Measured iterations a way.")
    parser.add_argument("--warmup", type=int, default=1, help="Iterations before them, not measured.")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts an iteration (K=4 answers each).")
    parser.add_argument("--tokens", type=int, default=256, help="Answer length limit of the served answers.")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    parser.add_argument("--prompt-file", type=Path, default=MT_BENCH)
    args = parser.parse_args()
    if not args.prompt_file.is_file():
        sys.exit(f"skipped: {args.prompt_file} is absent")
    device = learn_device("cpu")
    bf16 = use_bf16(None, device)
    torch.set_num_threads(THREADS)
    store = bench_store(args.data_dir, None)
    policy_dir = store.path("v0001")
    reward = reward_folder(policy_dir, args.data_dir / "bench-reward")
    rounds = args.iterations + args.warmup
    results: dict[str, list[dict[str, float]]] = {}
    served: list[Served] = []
    ptx: list[Example] = []
    for way in WAYS:
        config = RoundConfig(
            iterations=rounds,
            prompts_per_iteration=args.prompts,
            rollouts="served",
            ptx_batch=way.batch,
            ptx_pool=way.pool,
            # The LM loss, as its BENCHMARKS.md figures were measured; a round on the reference's answers now
            # reads them as KL to the reference (learn.ppo_run.RoundConfig.for_ptx), one more reference pass a batch.
            ppo=PPOConfig(ptx_coef=way.coef, epochs=2, minibatch=4, ptx_loss="lm"),
        )
        torch.manual_seed(0)
        models = load_models(policy_dir, policy_dir, reward, config, policy_dir, device)
        if not served:
            prompts = prompts_from_file(args.prompt_file, models.tokenizer, 256)[: args.prompts * rounds]
            served = served_answers(policy_dir, prompts, args, models)
            ptx = [e for group in reference_answers(served, PTX_MAX_LEN) for e in group]
        trainer = PPORound(models, config, [], ptx, served)
        print(f"{way.name}:", flush=True)
        rows = []
        with autocast(bf16, device):
            for n in range(rounds):
                figures = trainer.step()
                print(f"  iteration {n}: {figures['iteration_s']:.1f} s (update {figures['update_s']:.1f} s)")
                if n >= args.warmup:
                    rows.append(figures)
        results[way.name] = rows
    write_section("ptx_cost", report(results, args, bf16, ptx))


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace, bf16: bool, ptx: list[Example]) -> str:
    def mean(way: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[way])

    base = "4 a step, the same 4"
    tokens = statistics.mean(len(e.input_ids) for e in ptx)
    lines = [
        "## The ptx term's cost in a PPO iteration (issue 16)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; torch {torch.__version__}; {THREADS} CPU "
        f"threads; bf16 products {'on' if bf16 else 'off'} (the machine's default); nothing else running.",
        f"- Command: `.venv/bin/python bench/ptx_cost.py --iterations {args.iterations} --warmup {args.warmup}`.",
        f"- A round's default iteration: served rollouts, K=4 answers to each of {args.prompts} MT-bench prompts (up "
        f"to {args.tokens} tokens), SmolLM2-135M with adapters on the upper 6 layers, 2 epochs of mini-batches of "
        f"4 (16 optimiser steps); ptx texts: v0001's answers to the same prompts ({len(ptx)} texts, "
        f"{tokens:.0f} tokens on average with their prompt), ptx_coef 0.5; mean of {args.iterations} iterations "
        f"after {args.warmup} not measured.",
        "",
        "| ptx examples | update s | iteration s | ptx loss | iteration vs `4 a step, the same 4` |",
        "|---|---|---|---|---|",
    ]
    for way in results:
        loss = "-" if "ptx_loss" not in results[way][0] else f"{mean(way, 'ptx_loss'):.3f}"
        lines.append(
            f"| {way} | {mean(way, 'update_s'):.1f} | {mean(way, 'iteration_s'):.1f} | {loss} | "
            f"{mean(base, 'iteration_s') / mean(way, 'iteration_s'):.2f}x |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
