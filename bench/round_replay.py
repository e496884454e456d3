"""A loop demo's first rounds replayed, timed per phase, with the learner's cache of lower-layer states off and on
(`RANKLOOP_LEARN_LOWER_CACHE_MB`, learn.lower_cache; issue 16).

Each setting runs in a process of its own on a fresh copy of the run's v0001 and dataset, with the learner's
thread budget (`--threads`; 1 is what `rankloop up` gives the learner on a 2-core machine) and the run's settings.
Round k reads users' data up to the newest event the run's k-th reward model read, as the daemon did then: the
reward model is trained (continued after the first round), then a PPO round from v0001 with every evaluation
and the judgement; no version is promoted, so every round starts from v0001, and the second round finds v0001's
evaluation answers kept by the first, as in the run. The figures each round ends with (the reward model's
held-out accuracy, the new version's agreement with held-out rankings and its mean reward) are printed beside
the seconds: the cache may move them only in the last bits of a float.

    .venv/bin/python bench/round_replay.py var/demo-concise [--rounds 2] [--threads 1] [--cache-mb 1024]

With `--baseline REV` it compares the code of commit REV (checked out beside the repository, run with this
repository's environment) with the working tree's instead, both with the cache on.

    .venv/bin/python bench/round_replay.py var/demo-concise --rounds 1 --baseline 51da71d
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import machine, write_section  # noqa: E402

PHASES = ("reward_model", "load", "evaluate_before", "iterations", "evaluate_after", "judge", "publish")


def copied(run: Path, work: Path) -> Path:
    """v0001 (hard links: versions are never rewritten in place), as current and reference, and the dataset."""
    data = work / "data"
    models = data / "models"
    models.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(run / "models" / "v0001"), str(models / "v0001")], check=True)
    for pointer in ("CURRENT", "REFERENCE"):
        (models / pointer).write_text("v0001")
    shutil.copy(run / "feedback.sqlite3", data / "feedback.sqlite3")
    return data


def cuts(run: Path, rounds: int) -> list[str]:
    """The newest event each of the run's first reward models read."""
    found = []
    for r in sorted(p.name for p in (run / "reward_models").iterdir() if p.name.startswith("r"))[:rounds]:
        found.append(json.loads((run / "reward_models" / r / "card.json").read_text())["details"]["last_event_id"])
    if len(found) < rounds:
        raise SystemExit(f"{run} holds {len(found)} reward models: it cannot replay {rounds} rounds")
    return found


def replay(run: Path, rounds: int) -> list[dict[str, Any]]:
    """This process's rounds (its settings come from the environment)."""
    import learn.rounds as rounds_module
    from deploy.settings import load_settings
    from learn.daemon import compute, rm_options
    from learn.ppo_run import RoundConfig
    from learn.rounds import PPOOptions, ppo_round, rm_round

    settings = load_settings()
    device, bf16 = compute(settings)
    figures, reward = [], None
    for until in cuts(run, rounds):
        setattr(rounds_module, "last_event_id", lambda _settings, until=until: until)  # noqa: B010
        rm = rm_round(settings, rm_options(settings, reward), show_progress=False)
        reward = rm.version
        options = PPOOptions(
            parent="v0001",
            reward=reward,
            ptx_file=settings.learn_ptx_file,
            ptx_source=settings.learn_ptx_source,
            bf16=bf16,
            device=device,
        )
        ppo = ppo_round(settings, RoundConfig.from_settings(settings), options, show_progress=False)
        seconds = {"reward_model": rm.seconds, **ppo.seconds}
        figures.append(
            {
                "seconds": {phase: seconds.get(phase, 0.0) for phase in PHASES},
                "rm_accuracy": rm.evaluation.accuracy,
                "agreement": ppo.agreement.share(settings.learn_agreement_by),
                "pairs": ppo.agreement.pairs,
                "reward": ppo.after.reward,
            }
        )
    return figures


def checkout(rev: str, work: Path) -> Path:
    """The repository's files at commit `rev`, in `work` (a detached worktree, removed by the caller)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(work), rev], check=True)
    return work


def one_setting(run: Path, rounds: int, threads: int, cache_mb: int, code: Path = REPO) -> list[dict[str, Any]]:
    settings = json.loads((run / "demo.json").read_text()).get("settings", {})
    with tempfile.TemporaryDirectory(prefix="round-replay-") as work:
        env = {
            **os.environ,
            **{f"RANKLOOP_{k}": str(v) for k, v in settings.items()},
            "RANKLOOP_DATA_DIR": str(copied(run, Path(work))),
            "RANKLOOP_LEARN_THREADS": str(threads),
            "RANKLOOP_LEARN_LOWER_CACHE_MB": str(cache_mb),
            "OMP_NUM_THREADS": str(threads),
        }
        argv = [sys.executable, str(code / "bench" / "round_replay.py"), str(run), "--rounds", str(rounds), "--child"]
        out = subprocess.run(argv, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    result: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return result


def table(off: list[dict[str, Any]], on: list[dict[str, Any]], names: tuple[str, str], column: str = "cache") -> str:
    lines = [
        f"| round | {column} | {' | '.join(PHASES)} | whole round, minutes | reward model's accuracy | agreement | "
        "mean reward after |",
        "|---|---|" + "---|" * (len(PHASES) + 4),
    ]
    for k, (a, b) in enumerate(zip(off, on, strict=True), start=1):
        for name, row in zip(names, (a, b), strict=True):
            cells = " | ".join(f"{row['seconds'][p]:.0f}" for p in PHASES)
            whole = sum(row["seconds"].values()) / 60
            lines.append(
                f"| {k} | {name} | {cells} | {whole:.1f} | {row['rm_accuracy']:.3f} | "
                f"{row['agreement']:.3f} ({row['pairs']} pairs) | {row['reward']:.3f} |"
            )
        ratio = sum(a["seconds"].values()) / max(1e-9, sum(b["seconds"].values()))
        blanks = " | ".join("" for _ in PHASES)
        lines.append(f"| {k} | {names[0]} / {names[1]} | {blanks} | **{ratio:.2f}x** | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a loop demo's data folder (var/demo-...)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-mb", type=int, default=1024)
    parser.add_argument("--baseline", help="a commit to compare the working tree with (both with the cache on)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(replay(args.run, args.rounds)))
        return
    if args.baseline:
        compare_code(args)
    else:
        compare_cache(args)


def compare_cache(args: argparse.Namespace) -> None:
    off = one_setting(args.run, args.rounds, args.threads, 0)
    print(json.dumps(off), flush=True)
    on = one_setting(args.run, args.rounds, args.threads, args.cache_mb)
    print(json.dumps(on), flush=True)
    command = f".venv/bin/python bench/round_replay.py {args.run} --rounds {args.rounds} --threads {args.threads}"
    body = (
        "## A demo's rounds replayed with the lower-layer cache off and on (issue 16)\n\n"
        + header(args, command)
        + table(off, on, ("off", f"{args.cache_mb} MiB"))
    )
    write_section(f"round_replay_{args.run.name}", body)


def compare_code(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="round-replay-code-") as work:
        code = checkout(args.baseline, Path(work) / "code")
        try:
            before = one_setting(args.run, args.rounds, args.threads, args.cache_mb, code)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(code)], check=False)
    print(json.dumps(before), flush=True)
    now = one_setting(args.run, args.rounds, args.threads, args.cache_mb)
    print(json.dumps(now), flush=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    command = (
        f".venv/bin/python bench/round_replay.py {args.run} --rounds {args.rounds} --threads {args.threads} "
        f"--baseline {args.baseline}"
    )
    body = (
        f"## A demo's rounds replayed: {args.baseline} against {head.stdout.strip()} (issue 16)\n\n"
        + header(args, command)
        + table(before, now, (args.baseline, head.stdout.strip()), "code")
    )
    write_section(f"round_replay_{args.run.name}_code", body)


def header(args: argparse.Namespace, command: str) -> str:
    from datetime import date

    return (
        f"Date: {date.today()}; machine: {machine()}; {args.threads} learner thread(s), nothing else running.\n\n"
        f"Command: `{command}`\n\n"
        f"The first {args.rounds} round(s) of `{args.run.name}` (reward model, then PPO from v0001 with its "
        "evaluations and judgement), each on the users' data its round read in the run; seconds per phase"
        f"{'' if not args.baseline else f', the lower-layer cache on ({args.cache_mb} MiB) in both'}.\n\n"
    )


if __name__ == "__main__":
    main()
