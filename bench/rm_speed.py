"""Reward-model training speed: rankloop's K-wise trainer against TRL's RewardTrainer on the same K=4 groups.

SmolLM2-135M (v0001), fp32, 2 threads, answers cut to 256 tokens. The groups: Alpaca seed instructions, each with
4 answers (its own output and three others', in a fixed order). TRL trains on the C(4,2) = 6 pairs of each group
(2 forwards per pair); rankloop on the groups (4 forwards give the 6 pairs). Same prompts per step: 2 groups for
rankloop, their 12 pairs for TRL. The first step of each is warm-up. TRL runs in its own environment
(bench/trl_env.sh, or the interpreter `TRL_PYTHON` names), started from here. Figures go to BENCHMARKS.md, a section
per device (on a GPU the fp32 products run as TF32 on both sides, and each step is timed to the GPU's finish).

    .venv/bin/python bench/rm_speed.py [--steps 6] [--groups-per-step 2] [--device cuda] [--source MODEL]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import Device, bench_store, run_in_trl_env  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from learn.reward_model import group_loss, load_reward_model  # noqa: E402
from learn.rm_data import RankedGroup, encode_pair, prompt_key  # noqa: E402

SEEDS = REPO.parent / "shared" / "data" / "alpaca-seed-tasks.jsonl"
K, THREADS, MAX_LEN = 4, 2, 256


def groups_and_pairs(tokenizer: object, count: int) -> tuple[list[RankedGroup], list[dict[str, object]]]:
    tasks = [json.loads(line) for line in SEEDS.read_text().splitlines() if line.strip()]
    outputs = [t["instances"][0]["output"][:400] for t in tasks]
    groups, pairs = [], []
    for n in range(count):
        messages = [{"role": "user", "content": tasks[n]["instruction"]}]
        answers = [outputs[(n + j * 7) % len(outputs)] for j in range(K)]
        groups.append(
            RankedGroup(
                prompt_key(messages),
                [encode_pair(tokenizer, messages, a, MAX_LEN) for a in answers],
                [[j] for j in range(K)],
            )
        )
        for better, worse in combinations(range(K), 2):
            pairs.append(
                {
                    "prompt": messages,
                    "chosen": [{"role": "assistant", "content": answers[better]}],
                    "rejected": [{"role": "assistant", "content": answers[worse]}],
                }
            )
    return groups, pairs


def rankloop_speed(
    model_dir: Path, groups: list[RankedGroup], steps: int, per_step: int, device: Device
) -> dict[str, float]:
    device.prepare(THREADS)
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(model_dir, dtype=torch.float32)
    model.to(device.name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pad = int(tokenizer.pad_token_id)
    durations = []
    for step in range(steps):
        batch = groups[step * per_step : (step + 1) * per_step]
        started = time.perf_counter()
        loss, _, _ = group_loss(model, batch, pad)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.gpu:
            torch.cuda.synchronize()  # the GPU works ahead of Python: time the step to its end
        durations.append(time.perf_counter() - started)
    timed = durations[1:]
    pairs = len(timed) * per_step * K * (K - 1) // 2
    return {"pairs_per_s": pairs / sum(timed), "steps_timed": len(timed), "pairs_timed": pairs, "seconds": sum(timed)}


def trl_speed(
    model_dir: Path, pairs: list[dict[str, object]], steps: int, per_step: int, device: Device
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as out:
        out.writelines(json.dumps(p) + "\n" for p in pairs)
    return run_in_trl_env(
        "trl_reward_speed.py",
        str(model_dir),
        out.name,
        "--batch-pairs",
        str(per_step * K * (K - 1) // 2),
        "--steps",
        str(steps),
        "--threads",
        str(THREADS),
        "--max-length",
        str(MAX_LEN),
        *device.trl_args(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--groups-per-step", type=int, default=2, help="Prompts per step (TRL: their pairs).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--source", type=Path, help="Model to import when the bench store is empty (GGUF or folder).")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    if not SEEDS.is_file():
        sys.exit(f"skipped: {SEEDS} is absent")
    device = Device(args.device)
    store = bench_store(args.data_dir, args.source)
    model_dir = store.path(store.reference() or "v0001")
    _, tokenizer = load_reward_model(model_dir)
    per_step = args.groups_per_step
    groups, pairs = groups_and_pairs(tokenizer, args.steps * per_step)
    ours = rankloop_speed(model_dir, groups, args.steps, per_step, device)
    print(f"rankloop: {ours['pairs_per_s']:.2f} pairs/s", flush=True)
    theirs = trl_speed(model_dir, pairs, args.steps, per_step, device)
    print(f"TRL: {theirs['pairs_per_s']:.2f} pairs/s", flush=True)
    lengths = [len(a) for g in groups for a in g.answers]

    def row(name: str, r: dict[str, Any]) -> str:
        return f"| {name} | {r['pairs_per_s']:.2f} | {r['steps_timed']:.0f} | {r['seconds']:.1f} |"

    # A section per device and batch; the CPU figures at the batch keep their section's old name.
    section = "rm_speed" + ("_cuda" if device.gpu else "") + (f"_{per_step}_prompts" if per_step != 2 else "")
    where = f"{THREADS} threads each" if not device.gpu else "TF32 products"
    write_section(
        section,
        "\n".join(
            [
                f"## Reward-model training speed (issue 4, {device.name.upper()}, {per_step} prompts a step)",
                "",
                f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; "
                f"{where}; torch {torch.__version__}; TRL {theirs['trl']} with transformers "
                f"{theirs['transformers']} in its own environment, rankloop with transformers "
                f"{transformers.__version__}.",
                f"- Command: `.venv/bin/python bench/rm_speed.py --steps {args.steps} --groups-per-step {per_step} "
                f"--device {device.name}`.",
                f"- SmolLM2-135M (v0001) with a scalar head, fp32, AdamW, no gradient checkpointing; {len(groups)} "
                f"Alpaca seed instructions with K={K} answers each (prompt + answer {min(lengths)}-{max(lengths)} "
                f"tokens, cut at {MAX_LEN}); {per_step} prompts per step: rankloop scores their {per_step * K} "
                f"answers once, TRL's RewardTrainer gets their {per_step * K * (K - 1) // 2} pairs. First step of each "
                "is warm-up.",
                "",
                "| trainer | pairs/s | timed steps | seconds |",
                "|---|---|---|---|",
                row("TRL RewardTrainer (pairs)", theirs),
                row("rankloop K-wise (whole prompts)", ours),
                "",
                f"Ratio rankloop / TRL: **{ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}x** pairs per second "
                "(target >= 2.5x; the forward count alone gives 3x at K=4).",
                "",
            ]
        ),
    )


if __name__ == "__main__":
    main()
