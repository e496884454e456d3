"""Reward-model accuracy on real human preferences: HH-RLHF (harmless-base test split), trained on the first pairs,
pairwise accuracy on the remaining ones, rankloop's trainer beside TRL's RewardTrainer trained the same way.

SmolLM2-135M (the SFT reference), fp32, one epoch, same learning rate and batch (8 pairs = 8 prompts of K=2), no
length cut (max 1024 tokens, the longest in the file: TRL drops longer pairs rather than cutting them, so a shorter
limit would give the two trainers different data). Both trainers use gradient checkpointing: without it a batch of
long dialogues needs more than the 24 GB of this machine. Figures go to BENCHMARKS.md.

A full run takes hours per trainer on a small CPU machine, so both sides checkpoint as they go (under
var/bench-rm-accuracy/) and the same command resumes where a previous run stopped. Only accuracy is compared here:
a run stopped and resumed cannot be timed honestly, and bench/rm_speed.py measures speed side by side.

    .venv/bin/python bench/rm_accuracy.py [--train 1800] [--eval 512] [--no-trl]
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

from bench.common import bench_store, run_in_trl_env  # noqa: E402
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


def ours(model_dir: Path, n_train: int, n_eval: int, log: Path) -> dict[str, float]:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(model_dir)
    model.gradient_checkpointing_enable()  # 16 sequences of up to 1024 tokens: ~24 GB of activations without it
    train = list(hh_groups(HH, tokenizer, MAX_LEN, limit=n_train))
    held = list(hh_groups(HH, tokenizer, MAX_LEN, limit=n_eval, skip=_row_after(n_train)))
    config = LoopConfig(batch_size=BATCH, lr=LR, checkpoint_every=5)
    WORK.mkdir(parents=True, exist_ok=True)
    with MetricsLog(log) as metrics:
        _, evaluation = train_reward_model(model, tokenizer, train, held, config, metrics,
                                           WORK / f"ours-{n_train}.ckpt")  # fmt: skip
    return {"accuracy": evaluation.accuracy, "pairs": evaluation.pairs}


def _row_after(n_train: int) -> int:
    """The file row after the n_train-th usable pair (a few rows are skipped as malformed)."""
    import gzip

    usable = 0
    with gzip.open(HH, "rt", encoding="utf-8") as lines:
        for n, line in enumerate(lines):
            row = json.loads(line)
            chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
            if chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == "assistant":
                usable += 1
            if usable == n_train:
                return n + 1
    return n + 1


def theirs(model_dir: Path, n_train: int, n_eval: int) -> dict[str, Any]:
    work = WORK / f"trl-{n_train}"
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", conversational(HH, 0, n_train)),
                       ("eval", conversational(HH, _row_after(n_train), n_eval))):  # fmt: skip
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_in_trl_env("trl_reward_accuracy.py", str(model_dir), str(work / "train.jsonl"), str(work / "eval.jsonl"),
                          "--lr", str(LR), "--batch", str(BATCH), "--threads", str(THREADS), "--max-length",
                          str(MAX_LEN), "--output", str(work / "trainer"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1800)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    if not HH.is_file():
        sys.exit(f"skipped: {HH} is absent")
    store = bench_store(args.data_dir)
    model_dir = store.path(store.reference() or "v0001")
    log = args.data_dir / "runs" / "bench-rm-accuracy.jsonl"
    mine = ours(model_dir, args.train, args.eval, log)
    print(f"rankloop: accuracy {mine['accuracy']:.3f} on {mine['pairs']} pairs", flush=True)
    other = None if args.no_trl else theirs(model_dir, args.train, args.eval)
    if other:
        print(f"TRL: accuracy {other['accuracy']:.3f} on {other['pairs']} pairs", flush=True)
    lines = [
        "## Reward-model accuracy on human preferences (issue 4)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; {THREADS} threads each.",
        f"- Command: `.venv/bin/python bench/rm_accuracy.py --train {args.train} --eval {args.eval}"
        + (" --no-trl" if args.no_trl else "")
        + "`.",
        f"- Data: `hh-rlhf-harmless-base-test.jsonl.gz`, the first {args.train} usable pairs to train, the next "
        f"{args.eval} to evaluate (never the same rows). SmolLM2-135M (the SFT reference) with a scalar head, fp32, "
        f"one epoch, lr {LR}, {BATCH} pairs per step, no length cut (up to {MAX_LEN} tokens).",
        "",
        "| trainer | held-out pairwise accuracy | held-out pairs |",
        "|---|---|---|",
        f"| rankloop K-wise (K=2 here) | {mine['accuracy']:.3f} | {mine['pairs']} |",
    ]
    if other:
        lines.append(f"| TRL {other['trl']} RewardTrainer | {other['accuracy']:.3f} | {other['pairs']} |")
    lines += [
        "",
        "Published figures for larger models on HH-RLHF, for context: about 69% (DeBERTa-v3-large), 72-74% "
        "(GPT-2-large), about 78% (3B). Per-step figures: `" + str(log.relative_to(REPO)) + "`.",
        "",
    ]
    write_section("rm_accuracy", "\n".join(lines))


if __name__ == "__main__":
    main()
