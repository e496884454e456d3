"""How far each round of loop-demo runs moved its version from its parent: the per-answer KL to the parent on the
version's own evaluation answers (kept in the run's evals/answers), what the promotion gate reads as the step
(`learn.policy_eval.step_kl`); beside it the KL to v0001 the round recorded, and the gate's verdict on the round's
recorded figures then (without the step floor) and now (with it). Figures go to BENCHMARKS.md.

    .venv/bin/python bench/step_kl.py var/demo-concise var/demo-enthusiastic [--section step_kl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import machine, write_section  # noqa: E402
from deploy.model_store import ModelStore  # noqa: E402
from deploy.settings import load_settings  # noqa: E402
from learn import layers  # noqa: E402
from learn.daemon import limits  # noqa: E402
from learn.gate import Limits, promotion_gate  # noqa: E402
from learn.policy_eval import Agreement, Answers, PolicyEval, step_kl  # noqa: E402
from learn.ppo import backbone  # noqa: E402
from learn.weights import load_causal_lm, pad_id  # noqa: E402


def recorded_agreement(figures: dict[str, float]) -> Agreement:
    """The agreement a card recorded, as the gate reads it (its interval with the pairs taken as independent)."""
    nan = float("nan")
    return Agreement(
        figures.get("agreement", nan),
        int(figures.get("agreement_pairs", 0)),
        figures.get("agreement_detrended", nan),
        figures.get("agreement_per_token", nan),
        figures.get("agreement_reference", nan),
        int(figures.get("agreement_groups", 0)),
    )


def verdicts(details: dict[str, Any], step: float, gate: Limits) -> tuple[str, str]:
    """The gate on the round's recorded figures, without the step floor and with it: the limits of the settings
    this bench runs with (the demo's are the defaults), its agreement with the pairs taken as independent (cards
    keep the low ends by rankings only)."""
    if "agreement" not in details:
        return "not judged", "not judged"
    evaluation = details["eval"]
    before = PolicyEval(**evaluation["before"])
    after = replace(PolicyEval(**evaluation["after"]), parent_kl=step)
    found = recorded_agreement(details.get("agreement", {}))
    reference_ptx = evaluation.get("reference_ptx_loss")
    then = promotion_gate(before, after, found, replace(gate, min_step_kl=0.0), reference_ptx)
    now = promotion_gate(before, after, found, gate, reference_ptx)
    return ("passed" if then.passed else "refused"), ("passed" if now.passed else f"refused: {now.why}")


def measure(run: Path) -> list[str]:
    settings = load_settings(data_dir=run)
    store, gate = ModelStore(settings.store_dir), limits(settings)
    rows = []
    for version in store.versions():
        card = store.card(version)
        path = run / "evals" / "answers" / f"{version}.json"  # the round's evaluation answers (AnswerCache)
        if card.made_by != "ppo" or card.parent is None or "eval" not in card.details or not path.is_file():
            continue
        kept = Answers(**json.loads(path.read_text()))
        started = time.monotonic()
        policy, tokenizer = load_causal_lm(store.path(version))
        parent, _ = load_causal_lm(store.path(card.parent))
        # Rounds train the upper layers only; step_kl runs the lower ones once where the two share them.
        cut = layers.split_point(backbone(policy), settings.learn_train_layers)
        step = step_kl(policy, parent, kept, pad_id(tokenizer), split=cut)
        then, now = verdicts(card.details, step, gate)
        after = card.details["eval"]["after"]
        rows.append(
            f"| {run.name} | {version} (from {card.parent}) | {len(kept.responses)} | **{step:.2f}** | "
            f"{after['kl']:.2f} | {then} | {now} |"
        )
        print(f"{run.name} {version}: step {step:.2f} ({time.monotonic() - started:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--section", default="step_kl")
    args = parser.parse_args()
    rows = [row for run in args.runs for row in measure(run)]
    runs = " ".join(str(run) for run in args.runs)
    body = "\n".join(
        [
            "## How far each round moved its version: the step the gate reads (issue 16)",
            "",
            f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}.",
            "",
            f"Command: `.venv/bin/python bench/step_kl.py {runs}`",
            "",
            "Each version PPO made in the runs: its per-answer KL to its parent on its own evaluation answers (the "
            "round's, kept in evals/answers), beside the KL to v0001 its round recorded on the same answers (the "
            "same figure where the parent is v0001); and the promotion gate on the round's recorded figures, "
            f"without the step floor and with it (RANKLOOP_LEARN_MIN_STEP_KL, {limits(load_settings()).min_step_kl:g} "
            "nats an answer).",
            "",
            "| run | version | answers | KL to its parent | KL to v0001 (recorded) | gate without the floor | "
            "gate with it |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_section(args.section, body)


if __name__ == "__main__":
    main()
