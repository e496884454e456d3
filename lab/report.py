"""`rankloop report`: one HTML page (with PNG plots beside it) of how the model has been learning from its users.

Over time: rankings received, the reward model's held-out accuracy per version, PPO's mean reward, KL to the
reference, ptx loss and answer length, and the win rate of each evaluated version against v0001, with promotions
and rollbacks marked. Then the latest evaluation's sample answers, v0001's beside the newer version's.
Everything is read from what the system already keeps: the dataset, the model stores' cards, the metrics logs under
runs/, the evaluations under evals/ and the registry's events.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from deploy.registry import Event
from deploy.settings import Settings
from feedback.history import PPO_FIGURES, LearningHistory, Series, learning_history, win_rate_files
from lab.judge import Judgement


@dataclass
class History(LearningHistory):
    events: list[Event] = field(default_factory=list)
    latest: Judgement | None = None


def collect(settings: Settings, events: list[Event]) -> History:
    history = History(**vars(learning_history(settings)), events=events)
    files = win_rate_files(settings.data_dir)
    judged = sorted((Judgement.read(p) for p in files), key=lambda j: j.created)
    history.latest = judged[-1] if judged else None
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
    charts += [(f"ppo_{k}.png", title, history.ppo.get(k, [])) for k, title in PPO_FIGURES.items()]
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
            if event.action in ("promote", "rollback"):  # (canary events change no served version)
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
