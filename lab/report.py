"""`rankloop report`: one HTML page (with PNG plots beside it) of how the model has been learning from its users.

Over time: rankings received, the reward model's held-out accuracy per version, PPO's mean reward, KL to the
reference, ptx loss and answer length, and the win rate of each evaluated version against v0001, with promotions
and rollbacks marked. Then the latest evaluation's sample answers, v0001's beside the newer version's.
Everything is read from what the system already keeps: the dataset, the model stores' cards, the metrics logs under
runs/, the evaluations under evals/ and the registry's events.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from deploy.model_store import ModelStore
from deploy.registry import Event
from deploy.settings import Settings
from lab.judge import Judgement

Series = list[tuple[float, float]]  # (unix time, value)


@dataclass
class History:
    rankings: Series = field(default_factory=list)  # cumulative count
    rm_accuracy: Series = field(default_factory=list)
    ppo: dict[str, Series] = field(default_factory=dict)  # figure -> points
    win_rates: dict[str, Series] = field(default_factory=dict)  # preference -> points (version's creation time)
    win_labels: dict[str, list[str]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    latest: Judgement | None = None


PPO_PLOTS = {
    "reward": "mean reward (PPO rollouts)",
    "kl_per_answer": "KL to the reference per answer",
    "ptx_loss": "ptx loss",
    "answer_length": "answer length (tokens)",
}


def ranking_times(settings: Settings) -> Series:
    from feedback.dataset import Dataset

    if not settings.dataset_path.is_file():
        return []
    with Dataset(settings.dataset_path) as dataset:
        stamps = sorted(int(event_id.split("-")[0]) / 1000 for event_id in dataset.ids("ranking"))
    return [(t, float(n)) for n, t in enumerate(stamps, start=1)]


def collect(settings: Settings, events: list[Event]) -> History:
    history = History(rankings=ranking_times(settings), events=events)
    rewards = ModelStore(settings.reward_store_dir, prefix="r")
    for version in rewards.versions():
        card = rewards.card(version)
        accuracy = card.details.get("eval", {}).get("accuracy")
        if isinstance(accuracy, float) and accuracy == accuracy:  # NaN: nothing was held out
            history.rm_accuracy.append((card.created, accuracy))
    for log in sorted((settings.data_dir / "runs").glob("*-ppo-*.jsonl")):
        for row in map(json.loads, log.read_text().splitlines()):
            for figure in PPO_PLOTS:
                if figure in row:
                    history.ppo.setdefault(figure, []).append((row["time"], row[figure]))
    store = ModelStore(settings.store_dir)
    comparisons = [Judgement.read(p) for p in sorted((settings.data_dir / "evals").glob("*-vs-v0001-*.json"))]
    for comparison in sorted(comparisons, key=lambda c: c.created):
        when = store.card(comparison.a).created if comparison.a in store.versions() else comparison.created
        history.win_rates.setdefault(comparison.preference, []).append((when, comparison.win_rate.rate))
        history.win_labels.setdefault(comparison.preference, []).append(comparison.a)
        history.latest = comparison
    for series in (*history.ppo.values(), *history.win_rates.values()):
        series.sort()
    return history


def plot(history: History, folder: Path, origin: float) -> list[tuple[str, str]]:
    """PNG files in `folder`, one per figure that has data, hours counted from `origin`; returns (file, title)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    charts: list[tuple[str, str, Series]] = [
        ("rankings.png", "rankings received", history.rankings),
        ("rm_accuracy.png", "reward model held-out accuracy", history.rm_accuracy),
    ]
    charts += [(f"ppo_{k}.png", title, history.ppo.get(k, [])) for k, title in PPO_PLOTS.items()]
    charts += [
        (f"win_rate_{i}.png", f"win rate vs v0001 ({name})", points)
        for i, (name, points) in enumerate(history.win_rates.items())
    ]

    def hours(t: float) -> float:
        return (t - origin) / 3600

    made = []
    for name, title, points in charts:
        if not points:
            continue
        figure, axes = plt.subplots(figsize=(7, 3))
        axes.plot([hours(t) for t, _ in points], [v for _, v in points], marker="." if len(points) < 60 else None)
        for event in history.events:
            axes.axvline(hours(event.time), color="green" if event.action == "promote" else "red", alpha=0.4)
        axes.set_title(title)
        axes.set_xlabel("hours since the first ranking")
        figure.tight_layout()
        figure.savefig(folder / name, dpi=90)
        plt.close(figure)
        made.append((name, title))
    return made


def write_report(settings: Settings, events: list[Event], out: Path) -> Path:
    """Write `out` (HTML) and its PNGs in the same folder; returns `out`."""
    history = collect(settings, events)
    starts = [s[0][0] for s in (history.rankings, history.rm_accuracy, *history.ppo.values()) if s]
    out.parent.mkdir(parents=True, exist_ok=True)
    charts = plot(history, out.parent, min(starts, default=0.0))
    out.write_text(render(history, charts))
    return out


def render(history: History, charts: list[tuple[str, str]]) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>rankloop report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{vertical-align:top;padding:4px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc}</style>",
        "<h1>rankloop: learning from users</h1>",
        f"<p>{len(history.rankings)} rankings; {len(history.rm_accuracy)} reward models; "
        f"{sum(e.action == 'promote' for e in history.events)} promotions and "
        f"{sum(e.action == 'rollback' for e in history.events)} rollbacks (green and red lines).</p>",
    ]
    parts += [f"<h3>{html.escape(title)}</h3><img src='{name}' alt='{html.escape(title)}'>" for name, title in charts]
    if history.latest is not None:
        latest = history.latest
        rate = latest.win_rate
        parts.append(
            f"<h2>{html.escape(latest.a)} vs {html.escape(latest.b)} under {html.escape(latest.preference)}"
            f"</h2><p>win rate {rate.rate:.1%} (95% {rate.low:.1%}-{rate.high:.1%}) over {rate.n} pairs; "
            f"mean length {latest.length_a:.0f} vs {latest.length_b:.0f} characters</p>"
        )
        rows = "".join(
            f"<tr><td>{html.escape(e['prompt'])}</td><td>{html.escape(e['b'])}</td><td>{html.escape(e['a'])}</td></tr>"
            for e in latest.examples
        )
        parts.append(
            f"<table><tr><th>prompt</th><th>{html.escape(latest.b)}</th><th>{html.escape(latest.a)}</th>"
            f"</tr>{rows}</table>"
        )
    return "\n".join(parts)


def events_or_none(url: str) -> list[Event]:
    """The registry's events, or none when Redis cannot be reached (the report is still written)."""
    import redis

    from deploy.registry import Registry

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        return Registry(client).events(count=10_000)
    except redis.RedisError:
        return []
    finally:
        client.close()
