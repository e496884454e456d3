"""Reward-model learning curves on the rankings an hour of users brings: held-out accuracy after 32, 64, 128 and
256 rankings of real SmolLM2 answers, by the scripted preferences simulated users rank with, rankloop's trainer
beside TRL's RewardTrainer trained on the same pairs.

    .venv/bin/python bench/rm_learning_curve.py [--preferences concise,keyword:WORD,enthusiastic]
        [--sizes 32,64,128,256] [--configs 6:1e-4,6:3e-5,2:1e-4] [--epochs 4] [--trl-sizes 32,64,128,256]

1. Answers (once, kept in var/bench-rm-curve/answers.jsonl): v0001 answers each training prompt of rankloop's
   prompt set 3 times and each held-out prompt 8 times, K=4 answers a comparison, with vLLM in this process
   (temperature 1.0, max_tokens 256, the length most answers end within; the cut share is reported).
2. Rankings: each preference ranks each comparison as a simulated user does (lab.preferences.rank, noise 0.1;
   a comparison whose answers all tie gives no ranking); held-out comparisons are ranked without noise, and their
   pairs are what accuracy is measured on.
3. Training: for each configuration (upper layers trained : learning rate) and size N, rankloop's reward model on
   the first N training rankings (4 prompts a step), accuracy on every held-out pair after each epoch; TRL's
   RewardTrainer on the same (chosen, rejected) pairs with the same layers frozen, learning rate and epochs.
   A configuration may name the reward model's readout (`2:2e-4:mean`, `:lme`, `:last`, the default here:
   learn.rl_math.sequence_scores); TRL's side always reads the last token.
Everything is cached under var/bench-rm-curve, so a stopped run resumes; figures go to BENCHMARKS.md.

`--answers-from var/demo-NAME` takes the answers instead from the comparisons a `bench/loop_demo.py` run's users
ranked (v0001's, as the server wrote them; held out as the learner splits their prompts), for a curve without an
hour of generation; its cache and its section of BENCHMARKS.md are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / "var" / "bench-rm-curve"
K, MAX_TOKENS, TEMPERATURE, NOISE, THREADS = 4, 256, 1.0, 0.1, 2
TRAIN_SAMPLES, HELD_SAMPLES, MAX_LEN, BATCH = 3, 8, 512, 4
# Users of a demo are shown training prompts only: the served comparisons are split by the reward model's own
# split, a larger share than the learner's tenth so that the held-out pairs number in the hundreds.
SERVED_HELD_OUT = 0.3


@dataclass(frozen=True)
class AnswerSet:
    prompt: str
    prompt_ids: list[int]
    texts: list[str]
    token_ids: list[list[int]]
    cut: list[bool]
    held_out: bool


def generate(model_dir: Path, out: Path) -> None:
    """v0001's K answers to rankloop's prompts (train split 3 times, held-out split 8 times), one JSON line each."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from lab.simulate import split
    from learn.prompts import DEFAULT_PROMPTS, conversations, render

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, held = split(list(conversations(DEFAULT_PROMPTS)))
    jobs = [(m, False) for m in train for _ in range(TRAIN_SAMPLES)] + [
        (m, True) for m in held for _ in range(HELD_SAMPLES)
    ]
    llm = LLM(str(model_dir), enforce_eager=True, max_model_len=2048, dtype="bfloat16")
    params = SamplingParams(n=K, temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": render(tokenizer, m)} for m, _ in jobs], params)
    print(f"generated {len(jobs)} comparisons in {time.perf_counter() - started:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".partial").open("w") as lines:
        for (messages, held_out), output in zip(jobs, outputs, strict=True):
            row = AnswerSet(
                messages[-1]["content"],
                list(output.prompt_token_ids),
                [c.text for c in output.outputs],
                [list(c.token_ids) for c in output.outputs],
                [c.finish_reason == "length" for c in output.outputs],
                held_out,
            )
            lines.write(json.dumps(row.__dict__) + "\n")
    out.with_suffix(".partial").replace(out)


def served_answers(demo: Path, out: Path) -> None:
    """The comparisons of a demo's feedback dataset whose answers v0001 wrote, one AnswerSet line each."""
    from feedback.dataset import Dataset
    from learn.rm_data import is_rm_held_out, prompt_key

    with Dataset(demo / "feedback.sqlite3") as dataset:
        events = [e for _, e in dataset.rankings() if e.comparison.policy_version == "v0001"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as lines:
        for event in events:
            c = event.comparison
            row = AnswerSet(
                c.messages[-1]["content"],
                c.prompt_token_ids,
                [a.text for a in c.candidates],
                [a.token_ids for a in c.candidates],
                [a.finish_reason == "length" for a in c.candidates],
                is_rm_held_out(prompt_key(c.messages), SERVED_HELD_OUT),
            )
            lines.write(json.dumps(row.__dict__) + "\n")


def read_comparisons(path: Path) -> list[AnswerSet]:
    return [AnswerSet(**json.loads(line)) for line in path.read_text().splitlines()]


@dataclass(frozen=True)
class Ranked:
    comparison: int  # index into the comparisons
    tiers: list[list[int]]


def rank_all(comparisons: list[AnswerSet], preference: str, held_out: bool, seed: int = 0) -> list[Ranked]:
    """The rankings simulated users with `preference` give (noise 0.1; none for all-tied answers); held-out
    comparisons without noise: their pairs are the truth accuracy is measured against."""
    from lab.preferences import load_scorer, rank

    scorer, rng = load_scorer(preference), random.Random(seed)
    out = []
    for index, c in enumerate(comparisons):
        if c.held_out != held_out:
            continue
        tiers = rank([scorer(c.prompt, text) for text in c.texts], 0.0 if held_out else NOISE, rng)
        if len(tiers) >= 2:
            out.append(Ranked(index, tiers))
    return out


def group(c: AnswerSet, tiers: list[list[int]]) -> Any:
    from learn.rm_data import RankedGroup, prompt_key

    answers = [(c.prompt_ids + ids)[-MAX_LEN:] for ids in c.token_ids]
    key = prompt_key([{"role": "user", "content": c.prompt}])
    return RankedGroup(key, answers, tiers, "v0001", None, tuple(min(len(i), MAX_LEN) for i in c.token_ids))


class Lowers:
    """Every answer's hidden states below the trained layers, computed once per split for all runs: the lower
    layers are v0001's in every reward model here."""

    def __init__(self, model_dir: Path, comparisons: list[AnswerSet]) -> None:
        self.model_dir, self.comparisons, self.cache = model_dir, comparisons, {}  # type: ignore[var-annotated]

    def of(self, split: int, indices: list[int]) -> dict[int, list[Any]]:
        from learn.reward_model import compute_lowers, load_reward_model

        known: dict[int, list[Any]] = self.cache.setdefault(split, {})
        missing = [i for i in indices if i not in known]
        if missing:
            model, tokenizer = load_reward_model(self.model_dir)
            sequences = [a for i in missing for a in group(self.comparisons[i], [[0], [1]]).answers]
            started = time.perf_counter()
            flat = compute_lowers(model, sequences, int(tokenizer.pad_token_id), split)
            print(
                f"lower layers of {len(sequences)} answers (split {split}) in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
            for n, i in enumerate(missing):
                known[i] = flat[n * K : (n + 1) * K]
        return {i: known[i] for i in indices}


@dataclass(frozen=True)
class Config:
    train_layers: int
    lr: float
    readout: str = "last"  # how the reward model reads its score (learn.rl_math.READOUTS)

    @property
    def name(self) -> str:
        return f"{self.train_layers}:{self.lr:g}" + ("" if self.readout == "last" else f":{self.readout}")

    @staticmethod
    def parse(text: str) -> Config:
        layers, lr, *readout = text.split(":")
        return Config(int(layers), float(lr), *readout)


def ours(
    model_dir: Path,
    comparisons: list[AnswerSet],
    lowers: Lowers,
    train: list[Ranked],
    held: list[Ranked],
    config: Config,
    epochs: int,
) -> dict[str, Any]:
    """rankloop's reward model on `train`, held-out accuracy after each epoch."""
    import torch

    from learn import layers
    from learn.loop import LoopConfig
    from learn.reward_model import held_out_accuracy, load_reward_model, train_reward_model
    from learn.trainlog import MetricsLog

    torch.manual_seed(0)
    model, tokenizer = load_reward_model(
        model_dir, dtype=torch.float32, train_layers=config.train_layers, readout=config.readout
    )
    split = layers.split_point(layers.backbone_of(model), config.train_layers)
    pad = int(tokenizer.pad_token_id)
    train_groups = [group(comparisons[r.comparison], r.tiers) for r in train]
    held_groups = [group(comparisons[r.comparison], r.tiers) for r in held]
    train_lowers = lowers.of(split, [r.comparison for r in train])
    held_lowers = lowers.of(split, [r.comparison for r in held])
    per_epoch = -(-len(train) // BATCH)
    curve: list[float] = []

    def measure(step: int, of: int) -> None:
        if step % per_epoch == 0:
            found = held_out_accuracy(
                model, held_groups, pad, split=split, lowers=[held_lowers[r.comparison] for r in held]
            )
            curve.append(found.accuracy)

    started = time.perf_counter()
    with MetricsLog(None) as log:
        train_reward_model(
            model,
            tokenizer,
            train_groups,
            [],
            LoopConfig(epochs=epochs, batch_size=BATCH, lr=config.lr),
            log,
            show_progress=False,
            lowers=[train_lowers[r.comparison] for r in train],
            on_step=measure,
        )
    pairs = sum(len(_pairs(r.tiers)) for r in held)
    return {"curve": curve, "pairs": pairs, "seconds": time.perf_counter() - started}


def _pairs(tiers: list[list[int]]) -> list[tuple[int, int]]:
    from feedback.ranking import pairs

    return pairs(tiers)


def theirs(
    model_dir: Path,
    comparisons: list[AnswerSet],
    train: list[Ranked],
    held: list[Ranked],
    config: Config,
    epochs: int,
    work: Path,
    bf16: bool,
) -> dict[str, Any]:
    """TRL's RewardTrainer on the same pairs, the same layers, learning rate and epochs."""
    from bench.common import run_in_trl_env

    work.mkdir(parents=True, exist_ok=True)
    prompt = lambda c: [{"role": "user", "content": c.prompt}]  # noqa: E731
    rows = [
        {
            "prompt": prompt(comparisons[r.comparison]),
            "chosen": [{"role": "assistant", "content": comparisons[r.comparison].texts[w]}],
            "rejected": [{"role": "assistant", "content": comparisons[r.comparison].texts[lo]}],
        }
        for r in train
        for w, lo in _pairs(r.tiers)
    ]
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    answers, pairs = [], []
    for r in held:
        c = comparisons[r.comparison]
        base = len(answers)
        answers += [[prompt(c), text] for text in c.texts]
        pairs += [[base + w, base + lo] for w, lo in _pairs(r.tiers)]
    (work / "eval.json").write_text(json.dumps({"answers": answers, "pairs": pairs}))
    # 6 pairs per fully ranked prompt: 24 pairs a step is the 4 prompts a step of rankloop's side.
    return run_in_trl_env(
        "trl_reward_curve.py",
        str(model_dir),
        str(work / "train.jsonl"),
        str(work / "eval.json"),
        "--lr",
        str(config.lr),
        "--epochs",
        str(epochs),
        "--batch",
        str(BATCH * 6),
        "--train-layers",
        str(config.train_layers),
        "--threads",
        str(THREADS),
        "--output",
        str(work / "trainer"),
        *(["--bf16"] if bf16 else []),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers-only", action="store_true", help="Generate the answers and stop.")
    parser.add_argument("--preferences", default="concise,keyword:important,enthusiastic")
    parser.add_argument("--sizes", default="32,64,128,256")
    parser.add_argument(
        "--configs",
        default="6:1e-4",
        help="Comma-separated TRAIN_LAYERS:LR[:READOUT] (0 layers: all; readout: last, mean or lme).",
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trl-sizes", default="", help="Sizes TRL's side runs at (first configuration only).")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    parser.add_argument("--answers-from", type=Path, help="A loop_demo folder whose users' comparisons to rank.")
    args = parser.parse_args()
    global WORK, RESULTS
    if args.answers_from is not None:
        WORK = REPO / "var" / f"bench-rm-curve-{args.answers_from.name}"
        RESULTS = WORK / "results.json"
    import torch

    from bench.common import bench_store

    torch.set_num_threads(THREADS)
    store = bench_store(args.data_dir)
    model_dir = store.path(store.reference() or "v0001")
    answers = WORK / "answers.jsonl"
    if not answers.is_file():
        served_answers(args.answers_from, answers) if args.answers_from else generate(model_dir, answers)
    if args.answers_only:
        return
    comparisons = read_comparisons(answers)
    lowers = Lowers(model_dir, comparisons)
    results = load_results()
    sizes = [int(n) for n in args.sizes.split(",")]
    trl_sizes = {int(n) for n in args.trl_sizes.split(",") if n}
    configs = [Config.parse(c) for c in args.configs.split(",")]
    from learn.precision import autocast, use_bf16

    bf16 = use_bf16(None)  # as the learner runs on this machine
    for preference in args.preferences.split(","):
        train, held = rank_all(comparisons, preference, False), rank_all(comparisons, preference, True)
        for config in configs:
            for n in sizes:
                key = f"{preference}|{config.name}|{n}|{args.epochs}"
                if len(train) < n:
                    print(f"{preference}: only {len(train)} rankings, fewer than {n}", flush=True)
                    continue
                if key not in results:
                    with autocast(bf16):
                        results[key] = {
                            "ours": ours(model_dir, comparisons, lowers, train[:n], held, config, args.epochs)
                        }
                    save_results(results)
                if n in trl_sizes and config == configs[0] and "trl" not in results[key]:
                    work = WORK / "trl" / key.replace("|", "-").replace(":", "_")
                    results[key]["trl"] = theirs(
                        model_dir, comparisons, train[:n], held, config, args.epochs, work, bf16
                    )
                    save_results(results)
                print(key, json.dumps(results[key]), flush=True)
        write_report(args, comparisons, results)


RESULTS = WORK / "results.json"


def load_results() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_results(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def write_report(args: argparse.Namespace, comparisons: list[AnswerSet], results: dict[str, Any]) -> None:
    from bench.report import machine, write_section
    from learn.precision import use_bf16

    cut = sum(sum(c.cut) for c in comparisons) / sum(len(c.cut) for c in comparisons)
    lengths = sorted(len(ids) for c in comparisons for ids in c.token_ids)
    train_n, held_n = sum(1 for c in comparisons if not c.held_out), sum(1 for c in comparisons if c.held_out)
    if args.answers_from is None:
        source = (
            f"v0001 (SmolLM2-135M-Instruct), K={K} per comparison, temperature {TEMPERATURE}, max_tokens "
            f"{MAX_TOKENS}: {train_n} comparisons of the training prompts of rankloop's prompt set ({TRAIN_SAMPLES} "
            f"each), {held_n} of its held-out prompts ({HELD_SAMPLES} each)"
        )
    else:
        source = (
            f"the comparisons users ranked in {args.answers_from.name} (v0001's answers as the server wrote them, "
            f"K={K}): {train_n} comparisons to train on, {held_n} held out (a {SERVED_HELD_OUT:.0%} split of their "
            "prompts); only comparisons that run's preference did not rank all tied are there, so these answers lean "
            "towards that preference"
        )
    title = "" if args.answers_from is None else f", answers from {args.answers_from.name}"
    lines = [
        f"## Reward-model learning curves on ranked SmolLM2 answers (issue 16{title})",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; {THREADS} threads; "
        + ("bf16 products, as the learner uses them on this CPU." if use_bf16(None) else "fp32 products.")
        + "",
        f"- Command: `.venv/bin/python bench/rm_learning_curve.py --preferences {args.preferences} --sizes "
        f"{args.sizes} --configs {args.configs} --epochs {args.epochs}"
        + (f" --trl-sizes {args.trl_sizes}" if args.trl_sizes else "")
        + (f" --answers-from {args.answers_from}" if args.answers_from else "")
        + "`.",
        f"- Answers: {source}. Answer length median {lengths[len(lengths) // 2]} tokens; "
        f"**{cut:.0%} cut by the limit** (the rest ended by themselves).",
        f"- Rankings as simulated users give them (noise {NOISE}; all-tied comparisons give none), in the order "
        "generated; accuracy on every pair of the held-out comparisons ranked without noise. rankloop: K-wise loss, "
        f"{BATCH} prompts a step, AdamW, linear decay, the first N rankings; configuration = upper layers trained "
        "(and the head) : learning rate. TRL: RewardTrainer on the same (chosen, rejected) pairs, 24 pairs a step, "
        "the same layers frozen, learning rate and epochs; it tokenizes the answers' text anew (a cut answer gets "
        "the end-of-turn token) and HF's classifier reads the score at the last token that is not the pad token "
        "(SmolLM2's pad is its end-of-turn token).",
        "",
        "| preference | configuration | rankings | held-out pairs | rankloop accuracy after epoch 1, 2, ... | "
        "rankloop s | TRL accuracy (last epoch) | TRL s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, value in results.items():
        preference, config, n, _ = key.split("|")
        mine, other = value["ours"], value.get("trl")
        curve = ", ".join(f"{a:.3f}" for a in mine["curve"])
        trl = f"{other['accuracy']:.3f} | {other['seconds']:.0f}" if other else "- | -"
        lines.append(f"| {preference} | {config} | {n} | {mine['pairs']} | {curve} | {mine['seconds']:.0f} | {trl} |")
    section = "rm_learning_curve" + ("" if args.answers_from is None else f"_{args.answers_from.name}")
    write_section(section, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
