"""The whole loop on this machine: `rankloop up` (what `make run` starts) with auto-promotion and one
`rankloop simulate` for a fixed wall time; then the version served at the end is judged against v0001 on held-out
prompts, and the figures (win rate, the reward model's held-out accuracy, held-out LM loss against v0001's, where
the time went, sample answers) go to BENCHMARKS.md.

    .venv/bin/python bench/loop_demo.py --preference concise [--minutes 60] [--set LEARN_PPO_EPOCHS=2 ...]

Everything runs in a fresh data folder (var/demo-<preference>), on its own ports; `--set` passes RANKLOOP_ settings
to the stack exactly as an operator would put them in the environment, and they are written down with the figures.
`--finish` restarts the stack on the last run's folder, with no users, lets the learning round that the window's end
cut off finish (it resumes from its checkpoint), and judges what is served then; the report keeps both moments apart.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402

from bench.report import machine, write_section  # noqa: E402
from deploy.launcher import stop_group, wait_healthy  # noqa: E402
from deploy.learner_status import read_status  # noqa: E402
from deploy.model_store import ModelStore  # noqa: E402
from deploy.registry import Registry  # noqa: E402
from deploy.settings import load_settings  # noqa: E402
from feedback.history import rows_of  # noqa: E402

RANKLOOP = [sys.executable, "-m", "rankloop"]
PORTS = {"RANKLOOP_PORT": "8790", "RANKLOOP_REDIS_PORT": "6790", "RANKLOOP_LEARN_METRICS_PORT": "8791"}
DEFAULT_SETTINGS = {  # the demonstration's choices, on top of the embedded defaults; --set overrides them
    "LEARN_AUTO_PROMOTE": "true",
    # The ptx term on v0001's own answers: texts that teach no preference (the Alpaca seed tasks' short answers,
    # used before, taught `concise` with the reward zeroed), and the held-out LM-loss check has its texts.
    "LEARN_PTX_SOURCE": "reference",
}


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    entries: list[tuple[float, str]] = field(default_factory=list)
    last: str = ""

    def note(self, what: str) -> None:
        if what != self.last:
            self.last = what
            minutes = (time.monotonic() - self.started) / 60
            self.entries.append((minutes, what))
            print(f"[{minutes:5.1f} min] {what}", flush=True)


def environment(data: Path, settings: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **PORTS, "RANKLOOP_DATA_DIR": str(data)}
    env.update({f"RANKLOOP_{k}": v for k, v in settings.items()})
    return env


def watch(redis: Redis, timeline: Timeline, deadline: float, done: Callable[[str], bool]) -> None:
    """Note every change of the learner's phase and of the served version until `done(phase)` or the deadline."""
    registry = Registry(redis)
    while time.monotonic() < deadline:
        status = read_status(redis) or {}
        current = registry.current()[0]
        phase = status.get("phase", "starting")
        detail = status.get("detail", "")
        if phase == "ppo" and status.get("iteration") is not None:  # the evaluations and the publishing say theirs
            detail = f"PPO {status['iteration']}/{status.get('iterations')}"
        timeline.note(f"serving {current}; learner {phase}: {detail}")
        if done(phase):
            return
        time.sleep(5)


@contextmanager
def stack_up(env: dict[str, str], log: Path, timeout_s: float) -> Iterator[float]:
    """`rankloop up` with its output in `log`: yields the seconds it took to answer, and stops it on leaving."""
    with open(log, "wb") as out:
        stack = subprocess.Popen(
            [*RANKLOOP, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield wait_healthy(f"http://127.0.0.1:{PORTS['RANKLOOP_PORT']}", stack, timeout_s=timeout_s)
        finally:
            stop_group(stack)


def judged(env: dict[str, str], current: str, preference: str, samples: int) -> dict[str, Any]:
    argv = [*RANKLOOP, "eval", current, "v0001", "--preference", preference, "--samples", str(samples), "--json"]
    out = subprocess.run(
        argv,
        env={**env, "RANKLOOP_LEARN_THREADS": str(os.cpu_count() or 2)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def learning_figures(data: Path, current: str) -> dict[str, Any]:
    """The reward models' held-out accuracy, every round's outcome and phases, and the served version's held-out LM
    loss against v0001's."""
    settings = load_settings(data_dir=data)
    store, rewards = ModelStore(settings.store_dir), ModelStore(settings.reward_store_dir, prefix="r")
    figures: dict[str, Any] = {"reward_models": rewards.versions(), "policies": store.versions()}
    rounds = data / "runs" / "rounds.jsonl"
    figures["rounds"] = rows_of(rounds) if rounds.is_file() else []
    accuracies = [rewards.card(r).details.get("eval", {}).get("accuracy") for r in rewards.versions()]
    figures["rm_accuracy"] = accuracies
    phases: dict[str, float] = {}
    for run in sorted((data / "runs").glob("*-ppo-*.jsonl")):
        for line in run.read_text().splitlines():
            row = json.loads(line)
            for key in ("generate_s", "score_s", "update_s", "other_s"):
                phases[key] = phases.get(key, 0.0) + float(row.get(key, 0.0))
    figures["ppo_phases_s"] = phases
    chain, version = [], current
    while version and version != "v0001":
        card = store.card(version)
        chain.append(card)
        version = card.parent or ""
    if chain:
        first, last = chain[-1].details["eval"]["before"], chain[0].details["eval"]["after"]
        figures["ptx_v0001"], figures["ptx_current"] = first.get("ptx_loss"), last.get("ptx_loss")
    return figures


def finish(data: Path, overtime_minutes: float) -> None:
    """Let the round the window cut off finish, judge what is served then, and add it to the run's record."""
    record = json.loads((data / "demo.json").read_text())
    env = environment(data, record["settings"])
    timeline = Timeline()
    with stack_up(env, data / "stack-finish.log", overtime_minutes * 60) as ready:
        timeline.note(f"stack restarted with no users, ready after {ready:.0f} s")
        redis = Redis(port=int(PORTS["RANKLOOP_REDIS_PORT"]))
        # No users: the round in flight is over once the learner is back to waiting for rankings (or failed).
        watch(redis, timeline, timeline.started + overtime_minutes * 60, lambda phase: phase in ("waiting", "error"))
        current = Registry(redis).current()[0] or "v0001"
    record["finish"] = {
        "current": current,
        "timeline": timeline.entries,
        "eval": judged(env, current, record["args"]["preference"], record["args"]["samples"])
        if current != "v0001"
        else None,
        **learning_figures(data, current),
    }
    (data / "demo.json").write_text(json.dumps(record, indent=1))
    report(record, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preference", default="concise")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second, all users (0: no limit)")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out prompt in the final judgement")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a RANKLOOP_ setting")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the last run's record")
    parser.add_argument(
        "--finish",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="finish the last run's cut-off round (within MINUTES, no users)",
    )
    args = parser.parse_args()
    settings = {**DEFAULT_SETTINGS, **dict(item.split("=", 1) for item in args.set)}
    data = REPO / "var" / f"demo-{label(args.preference, settings)}"
    if args.report_only:
        report(json.loads((data / "demo.json").read_text()), data)
        return
    if args.finish:
        finish(data, args.finish)
        return
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    env = environment(data, settings)
    timeline = Timeline()
    deadline = timeline.started + args.minutes * 60
    with stack_up(env, data / "stack.log", args.minutes * 60) as ready:
        timeline.note(f"stack ready after {ready:.0f} s (model import and engine start included)")
        simulate_argv = [
            *RANKLOOP,
            "simulate",
            "--preference",
            args.preference,
            "--noise",
            str(args.noise),
            "--users",
            str(args.users),
            "--rate",
            str(args.rate),
            "--duration",
            str(max(1.0, deadline - time.monotonic())),
        ]
        with open(data / "simulate.log", "wb") as simulate_log:
            simulate = subprocess.Popen(simulate_argv, env=env, stdout=simulate_log, stderr=subprocess.STDOUT)
            redis = Redis(port=int(PORTS["RANKLOOP_REDIS_PORT"]))
            watch(redis, timeline, deadline, lambda _: simulate.poll() is not None)
            current = Registry(redis).current()[0] or "v0001"
            timeline.note(f"{args.minutes:.0f} minutes: serving {current}")
            stop_group(simulate, grace_s=10)
    result = judged(env, current, args.preference, args.samples) if current != "v0001" else None
    figures = learning_figures(data, current)
    # The newest version made, when it is not the one served (a control's rounds may make versions the gate
    # refuses): judged too, so that what PPO learned shows whether or not it went live.
    newest = figures["policies"][-1] if figures["policies"] else "v0001"
    latest = judged(env, newest, args.preference, args.samples) if newest not in (current, "v0001") else None
    subprocess.run([*RANKLOOP, "report"], env=env, check=False, capture_output=True)
    record = {
        "settings": settings,
        "args": vars(args),
        "current": current,
        "timeline": timeline.entries,
        "eval": result,
        "newest": newest,
        "newest_eval": latest,
        "date": str(datetime.date.today()),
        "machine": machine(),
        **figures,
    }
    (data / "demo.json").write_text(json.dumps(record, indent=1))
    report(record, data)


def compact(entries: list[tuple[float, str]]) -> list[str]:
    """One line per run of entries that differ only in their numbers (a count of rankings, a PPO iteration)."""
    lines: list[str] = []
    for _, run in itertools.groupby(entries, key=lambda entry: re.sub(r"\d+", "#", entry[1])):
        first, *rest = list(run)
        if rest:
            lines.append(f"- {first[0]:5.1f}-{rest[-1][0]:.1f} min: {first[1]} … {rest[-1][1]}")
        else:
            lines.append(f"- {first[0]:5.1f} min: {first[1]}")
    return lines


def outcome(name: str, when: str, current: str, result: dict[str, Any] | None, figures: dict[str, Any]) -> list[str]:
    """The figures of one moment of a run: what was served, its win rate, the reward models, the LM loss, PPO's time."""
    if result is None:
        lines = [f"- No version was promoted {when}: v0001 still served."]
    else:
        rate = result["win_rate"]
        pairs = rate["wins"] + rate["ties"] + rate["losses"]
        lines = [
            f"- Served {when}: {current}. Win rate over v0001 under `{name}` on {result['prompts']} "
            f"held-out prompts x {result['samples_per_prompt']} samples: **{rate['rate']:.1%}** (95% "
            f"{rate['low']:.1%}-{rate['high']:.1%}; {rate['wins']} wins, {rate['ties']} ties, "
            f"{rate['losses']} losses of {pairs}); mean answer length {result['length_a']:.0f} vs "
            f"{result['length_b']:.0f} characters."
        ]
    accuracies = ", ".join(
        f"{r} {a:.3f}" for r, a in zip(figures["reward_models"], figures["rm_accuracy"], strict=True) if a is not None
    )
    lines.append(f"- Reward models' held-out pairwise accuracy: {accuracies or 'none trained'}.")
    if figures.get("ptx_v0001"):
        ratio = figures["ptx_current"] / figures["ptx_v0001"]
        lines.append(
            f"- Held-out LM loss: v0001 {figures['ptx_v0001']:.3f}, {current} {figures['ptx_current']:.3f} "
            f"({ratio:.3f}x)."
        )
    phases = figures.get("ppo_phases_s", {})
    if phases:
        total = sum(phases.values())
        lines.append(
            "- PPO iterations: "
            + ", ".join(f"{k.removesuffix('_s')} {v / 60:.1f} min ({v / total:.0%})" for k, v in phases.items())
        )
    return lines + rounds_table(figures.get("rounds", []))


PHASES = ("reward_model", "load", "evaluate_before", "iterations", "evaluate_after", "judge", "publish")


def num(value: float | None) -> float:
    """A figure of rounds.jsonl, where one not measured is null (NaN before): NaN either way, which formats."""
    return float("nan") if value is None else value


def rounds_table(rounds: list[dict[str, Any]]) -> list[str]:
    """One row per learning round: its outcome, what the gate said, its answers' shares and where its time went."""
    if not rounds:
        return []
    lines = [
        "",
        "| round | outcome | reward model held-out accuracy (pairs) | new version: empty / degenerate / cut, "
        "length (tokens), KL to its parent / to v0001 | agreement summed / a token / a token since v0001 (pairs) "
        "| minutes: " + ", ".join(PHASES) + " | total | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in enumerate(rounds, start=1):
        seconds = r.get("seconds", {})
        after = r.get("after")
        shares = (
            (
                f"{num(after['empty']):.0%} / {num(after['degenerate']):.0%} / {num(after['truncated']):.0%}, "
                f"{num(after['answer_length']):.0f}, {num(after.get('parent_kl')):.1f} / {num(after['kl']):.1f}"
            )
            if after
            else "-"
        )
        agreement = (
            f"{num(r['agreement']):.2f} / {num(r.get('agreement_per_token')):.2f} / "
            f"{num(r.get('agreement_reference')):.2f} ({num(r['agreement_pairs']):.0f})"
            if "agreement" in r
            else "-"
        )
        phases = ", ".join(f"{seconds.get(p, 0) / 60:.1f}" for p in PHASES)
        accuracy = f"{num(r.get('rm_accuracy')):.3f} ({num(r.get('rm_pairs', 0)):.0f})"
        made = f"{r['version']} from {r['parent']}" if "parent" in r else r.get("version", r.get("reward_model"))
        lines.append(
            f"| {n}: {made} | {r['outcome']} | {accuracy} | {shares} | "
            f"{agreement} | {phases} | {sum(seconds.values()) / 60:.1f} | {r.get('gate', '')} |"
        )
    return lines


def label(preference: str, settings: dict[str, str]) -> str:
    """A run's name: the preference, `-control` where PPO's reward was replaced by 0, and each other setting the
    run changed (`-learn_ppo_iterations-4`), so that a trial of a setting keeps the default run's folder and section."""
    changed = "".join(
        f"-{key.lower()}-{value}"
        for key, value in sorted(settings.items())
        if key != "LEARN_REWARD" and DEFAULT_SETTINGS.get(key) != value
    )
    control = "-control" if settings.get("LEARN_REWARD") == "zero" else ""
    return preference.replace(":", "-") + control + changed.replace("/", "_")


def report(record: dict[str, Any], data: Path) -> None:
    """BENCHMARKS.md's section for one run, from its record (demo.json): `--report-only` rewrites it from there."""
    args, settings, current, result = record["args"], record["settings"], record["current"], record["eval"]
    name, minutes = args["preference"], args["minutes"]
    sets = " ".join(f"--set {k}={v}" for k, v in settings.items() if k not in DEFAULT_SETTINGS)
    control = " (control: PPO's reward-model score replaced by 0)" if settings.get("LEARN_REWARD") == "zero" else ""
    lines = [
        f"## The whole loop: `{name}` users for {minutes:g} minutes{control}",
        "",
        f"Date: {record['date']}; machine: {record['machine']}.",
        "",
        f"Command: `.venv/bin/python bench/loop_demo.py --preference {name} --minutes {minutes:g} --noise "
        f"{args['noise']} --users {args['users']} --rate {args['rate']} {sets}`",
        "",
        "Settings: " + ", ".join(f"RANKLOOP_{k}={v}" for k, v in settings.items()),
        "",
    ]
    lines += outcome(name, f"within {minutes:g} minutes", current, result, record)
    if record.get("newest_eval"):
        rate = record["newest_eval"]["win_rate"]
        lines.append(
            f"- The newest version, {record['newest']} (not served), against v0001: {rate['rate']:.1%} (95% "
            f"{rate['low']:.1%}-{rate['high']:.1%})."
        )
    lines += ["", "Where the time went:", "", *compact(record["timeline"])]
    late = record.get("finish")
    if late is not None:  # `--finish`: the cut-off round, finished after the window
        spent = late["timeline"][-1][0] if late["timeline"] else 0.0
        lines += [
            "",
            f"After the window (`--finish`: the stack restarted with no users; the round the window cut "
            f"off resumed from its checkpoint, {spent:.1f} more minutes):",
            "",
            *outcome(name, "after the window", late["current"], late["eval"], late),
            "",
            "Where the extra time went:",
            "",
            *compact(late["timeline"]),
        ]
        current, result = late["current"], late["eval"]
    if result is not None:
        lines += ["", f"Samples (held-out prompts; {current} | v0001):", ""]
        for example in result["examples"][:3]:
            lines.append(f"- {example['prompt']!r}: {example['a']!r} | {example['b']!r}")
    lines += ["", f"Data, logs and the HTML report (report/index.html): {data.relative_to(REPO)}/ (not committed)."]
    write_section(f"loop-{label(name, settings)}", "\n".join(lines))


if __name__ == "__main__":
    main()
