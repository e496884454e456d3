"""Agreement with held-out rankings, on the raw summed log-ratios, detrended (less what length alone predicts) and
a token, of every version PPO trained in loop-demo runs, each against its parent (and a token against the SFT
reference, v0001), on the held-out rankings its round judged it by (the newest 64 held-out ranked comparisons
when its card was written). Figures go to BENCHMARKS.md.

    .venv/bin/python bench/agreement_bias.py var/demo-concise var/demo-concise-control [--versions v0002,v0003]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import machine, write_section  # noqa: E402
from deploy.model_store import ModelStore  # noqa: E402
from deploy.settings import load_settings  # noqa: E402
from learn import layers  # noqa: E402
from learn.policy_eval import agreement  # noqa: E402
from learn.ppo import backbone  # noqa: E402
from learn.rm_data import split  # noqa: E402
from learn.rounds import JUDGED_GROUPS  # noqa: E402
from learn.sources import FEEDBACK, load_groups  # noqa: E402
from learn.weights import load_causal_lm, pad_id  # noqa: E402


def measure(run: Path, only: set[str] | None) -> list[str]:
    settings = load_settings(data_dir=run)
    store = ModelStore(settings.store_dir)
    rows = []
    first = store.reference() or "v0001"
    reference, _ = load_causal_lm(store.path(first))
    for version in store.versions():
        card = store.card(version)
        if card.made_by != "ppo" or card.parent is None or (only and version not in only):
            continue
        started = time.monotonic()
        policy, tokenizer = load_causal_lm(store.path(version))
        # A first round's parent is the reference itself: one copy, and agreement() then makes one pass for both.
        parent = reference if card.parent == first else load_causal_lm(store.path(card.parent))[0]
        until = f"{int(card.created * 1000)}-999999"  # the rankings there were when the round judged it
        _, held = split(load_groups(FEEDBACK, settings, tokenizer, 1024, until=until), settings.learn_rm_held_out)
        judged = held[-JUDGED_GROUPS:]
        # Rounds train the upper layers only: where the lower ones are the same, they run once for all three models.
        cut = layers.split_point(backbone(policy), settings.learn_train_layers)
        found = agreement(policy, parent, judged, pad_id(tokenizer), split=cut, reference=reference)
        recorded = card.details.get("agreement", {}).get("agreement", float("nan"))
        after, before = card.details["eval"]["after"], card.details["eval"]["before"]
        rows.append(
            f"| {run.name} | {version} (from {card.parent}) | {found.pairs} | {recorded:.3f} | {found.rate:.3f} | "
            f"{found.detrended:.3f} | {found.per_token:.3f} | {found.interval('per_token', 'pairs')[0]:.3f} | "
            f"{found.groups} | {found.interval('per_token', 'rankings')[0]:.3f} | {found.reference:.3f} | "
            f"{before['answer_length']:.0f} → {after['answer_length']:.0f} |"
        )
        print(rows[-1], f"({time.monotonic() - started:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--versions", default="", help="only these versions (comma-separated)")
    parser.add_argument("--section", default="agreement_bias", help="BENCHMARKS.md section to write")
    args = parser.parse_args()
    torch.set_num_threads(2)
    only = set(args.versions.split(",")) - {""} or None
    rows = [row for run in args.runs for row in measure(run, only)]
    command = " ".join(
        ["bench/agreement_bias.py", *map(str, args.runs)]
        + (["--versions", args.versions] * bool(only))
        + (["--section", args.section] * (args.section != "agreement_bias"))
    )
    lines = [
        "## Agreement with held-out rankings: raw, detrended, a token, and its interval by rankings (issue 16)",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}.",
        "",
        f"Command: `.venv/bin/python {command}`",
        "",
        "Each version PPO trained, against its parent, on the newest 64 held-out ranked comparisons there were when "
        "its card was written (what its round judged it by, up to rankings that arrived while it was being judged). "
        "Raw: the share of pairs whose preferred answer the policy made more likely than the other, relative to "
        "the parent, by the summed log-ratio; detrended: the same less each answer's length times the mean "
        "per-token shift; per token: on each answer's mean log-ratio a token; against v0001: the same a token, "
        "relative to the SFT reference instead of the parent. The 95% low ends of the share a token: with the "
        "pairs taken as independent, and by the spread of the rankings they come from (learn.winrate.grouped_interval, "
        "what the gate reads).",
        "",
        "| run | version | pairs | agreement when judged | raw now | detrended | per token | its 95% low, pairs "
        "independent | rankings | its 95% low by rankings | a token against v0001 | answer length (tokens), parent → "
        "it |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_section(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
