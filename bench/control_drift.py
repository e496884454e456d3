"""What moves a policy when PPO's reward is zeroed: one PPO round from v0001 with the reward-model score replaced
by 0 (`RANKLOOP_LEARN_REWARD=zero`, as the loop demo's control), under variants of the other terms (the ptx term's
weight, the KL penalty's), on a copy of a demo run's data (its rankings, served answers and reward models); each
new version's answer length and its win rate over v0001 under the run's preference. With `--keep-score` the same
rounds with the score kept, to compare variants of learning (`adv=rloo`: RLOO's advantages; `lr=`, `it=`,
`prompts=`: the learning rate, iterations and served comparisons an iteration; `clip=iteration`: decoupled
PPO's clip; `ptxloss=lm` or `ptxloss=reference_kl`: the ptx term's loss). Figures go to BENCHMARKS.md.

    .venv/bin/python bench/control_drift.py var/demo-concise-control [--reward r0002] [--variants ptx=0.5,ptx=0]
        [--set LEARN_PTX_FILE= --set LEARN_PTX_SOURCE=reference]
    .venv/bin/python bench/control_drift.py var/demo-concise --keep-score --reward r0001 --variants adv=gae,adv=rloo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.loop_demo import RANKLOOP, judged  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from deploy.model_store import ModelStore  # noqa: E402
from deploy.settings import load_settings  # noqa: E402

OPTIONS = {  # name=value
    "ptx": "--ptx-coef",
    "kl": "--kl-coef",
    "adv": "--advantage",
    "lr": "--lr",
    "it": "--iterations",
    "prompts": "--prompts-per-iteration",
    "clip": "--clip-centre",
    "ptxloss": "--ptx-loss",
}
FLAGS = {"fixed": "--fixed-kl"}  # bare names


def flags_of(variant: str) -> list[str]:
    """`ptx=0+kl=0+fixed` -> the `rankloop learn ppo` options it stands for."""
    found: list[str] = []
    for part in variant.split("+"):
        name, _, value = part.partition("=")
        found += [OPTIONS[name], value] if value else [FLAGS[name]]
    return found


def copied(run: Path, work: Path) -> Path:
    """The run's stores (hard links: versions are never rewritten in place) and its dataset, in `work`."""
    data = work / "data"
    data.mkdir(parents=True)
    for name in ("models", "reward_models"):
        subprocess.run(["cp", "-al", str(run / name), str(data / name)], check=True)
    shutil.copy(run / "feedback.sqlite3", data / "feedback.sqlite3")
    return data


def one_round(env: dict[str, str], reward: str, variant: str) -> tuple[str, float]:
    """A round from v0001 with the variant's options; the new version and the minutes it took."""
    flags = flags_of(variant)
    started = time.monotonic()
    # `learn ppo` takes its ptx texts from the settings, as the daemon does: the run's, or those --set gives.
    argv = [*RANKLOOP, "learn", "ppo", "--from", "v0001", "--reward", reward, *flags]
    subprocess.run(argv, env=env, check=True)
    store = ModelStore(load_settings(data_dir=Path(env["RANKLOOP_DATA_DIR"])).store_dir)
    return store.versions()[-1], (time.monotonic() - started) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a loop demo's data folder")
    parser.add_argument("--reward", default="r0002")
    parser.add_argument("--variants", default="ptx=0.5,ptx=0", help="comma-separated; `ptx=0+kl=0+fixed` combines")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--keep-score", action="store_true", help="PPO's reward-model score kept (not a control)")
    parser.add_argument("--section", default="", help="BENCHMARKS.md section to write (default: named by the run)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a RANKLOOP_ setting over the run's (KEY=: unset)",
    )
    args = parser.parse_args()
    record = json.loads((args.run / "demo.json").read_text())
    preference, changes = record["args"]["preference"], dict(item.split("=", 1) for item in args.set)
    settings = {k: v for k, v in {**record["settings"], **changes}.items() if v}
    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    data = copied(args.run, work)
    env = {
        **os.environ,
        **{f"RANKLOOP_{k}": v for k, v in settings.items()},
        "RANKLOOP_LEARN_REWARD": "model" if args.keep_score else "zero",
        "RANKLOOP_DATA_DIR": str(data),
    }
    rows = []
    for variant in args.variants.split(","):
        version, minutes = one_round(env, args.reward, variant)
        card: dict[str, Any] = ModelStore(data / "models").card(version).details
        before, after = card["eval"]["before"], card["eval"]["after"]
        result = judged(env, version, preference, args.samples)
        rate, agreed = result["win_rate"], card["agreement"]
        pairs = rate["wins"] + rate["ties"] + rate["losses"]
        rows.append(
            f"| {variant} | {version} | {before['answer_length']:.0f} → {after['answer_length']:.0f} tokens; "
            f"{result['length_b']:.0f} → {result['length_a']:.0f} characters judged | {after['kl']:.1f} | "
            f"{agreed['agreement']:.3f} / {agreed.get('agreement_per_token', float('nan')):.3f} / "
            f"{agreed.get('agreement_reference', float('nan')):.3f} | "
            f"**{rate['rate']:.1%}** ({rate['low']:.1%}-{rate['high']:.1%}, "
            f"{pairs} pairs) | {minutes:.1f} |"
        )
        print(rows[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    title = "One round from v0001"
    if not args.keep_score:
        title = "What moves a policy with its reward zeroed: one round from v0001"
    lines = [
        f"## {title} on `{args.run.name}` (issue 16)",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}.",
        "",
        f"Command: `.venv/bin/python bench/control_drift.py {args.run}{' --keep-score' * args.keep_score} --reward "
        f"{args.reward} --variants {args.variants}{''.join(f' --set {k}={v}' for k, v in changes.items())}"
        f"{f' --section {args.section}' if args.section else ''}`",
        "",
        f"One PPO round each (default settings, the run's: {', '.join(f'{k}={v}' for k, v in settings.items())}), "
        f"from v0001 against {args.reward}{'' if args.keep_score else ' with its score replaced by 0'}, on the run's "
        f"rankings and served answers; judged against v0001 under `{preference}` on held-out prompts, "
        f"{args.samples} answers each. Agreement with held-out rankings: summed / a token / a token since v0001 (the "
        "same as a token here: every round starts from v0001).",
        "",
        "| variant | version | answer length, v0001 → it | KL | agreement | win rate over v0001 (95%) | minutes |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    changed = "".join(f"-{k.lower()}-{v}" for k, v in sorted(changes.items()) if v)
    kind = "round_variants" if args.keep_score else "control_drift"
    write_section(args.section or f"{kind}_{args.run.name}{changed.replace('/', '_')}", "\n".join(lines))


if __name__ == "__main__":
    main()
