"""How the model has been learning from its users, as time series read from what the system already keeps: the
dataset's rankings, the reward models' cards, the PPO metrics logs under runs/ and the win rates under evals/.

`rankloop report` plots them into an HTML page; the operator console draws them from `GET /admin/history`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.model_store import ModelStore
from deploy.settings import Settings
from feedback.dataset import Dataset

Series = list[tuple[float, float]]  # (unix time, value)

PPO_FIGURES = {
    "reward": "mean reward (PPO rollouts)",
    "kl_per_answer": "KL to the reference per answer",
    "ptx_loss": "ptx loss",
    "answer_length": "answer length (tokens)",
    "advantage_scale": "advantages' spread before whitening",
    "advantage_floor": "the least they are divided by",
}


@dataclass
class LearningHistory:
    rankings: Series = field(default_factory=list)  # cumulative count
    rm_accuracy: Series = field(default_factory=list)
    ppo: dict[str, Series] = field(default_factory=dict)  # figure -> points
    win_rates: dict[str, Series] = field(default_factory=dict)  # preference -> points (version's creation time)
    win_labels: dict[str, list[str]] = field(default_factory=dict)  # preference -> the version of each point


def ranking_times(dataset_path: Path) -> Series:
    if not dataset_path.is_file():
        return []
    with Dataset(dataset_path) as dataset:
        stamps = sorted(int(event_id.split("-")[0]) / 1000 for event_id in dataset.ids("ranking"))
    return [(t, float(n)) for n, t in enumerate(stamps, start=1)]


def win_rate_files(data_dir: Path) -> list[Path]:
    """The saved judgements of a version against v0001 (lab.judge writes them)."""
    return sorted((data_dir / "evals").glob("*-vs-v0001-*.json"))


def learning_history(settings: Settings) -> LearningHistory:
    history = LearningHistory(rankings=ranking_times(settings.dataset_path))
    rewards = ModelStore(settings.reward_store_dir, prefix="r")
    for version in rewards.versions():
        card = rewards.card(version)
        accuracy = card.details.get("eval", {}).get("accuracy")
        if isinstance(accuracy, float) and accuracy == accuracy:  # NaN: nothing was held out
            history.rm_accuracy.append((card.created, accuracy))
    for log in sorted((settings.data_dir / "runs").glob("*-ppo-*.jsonl")):
        for row in rows_of(log):
            for figure in PPO_FIGURES:
                if _finite(row.get(figure)) and _finite(row.get("time")):
                    history.ppo.setdefault(figure, []).append((row["time"], row[figure]))
    store = ModelStore(settings.store_dir)
    versions = set(store.versions())
    judged: list[dict[str, Any]] = [json.loads(p.read_text()) for p in win_rate_files(settings.data_dir)]
    for judgement in sorted(judged, key=lambda j: float(j["created"])):
        version = str(judgement["a"])
        when = store.card(version).created if version in versions else float(judgement["created"])
        history.win_rates.setdefault(judgement["preference"], []).append((when, float(judgement["win_rate"]["rate"])))
        history.win_labels.setdefault(judgement["preference"], []).append(version)
    for series in (*history.ppo.values(), *history.win_rates.values()):
        series.sort()
    return history


def rows_of(log: Path) -> list[dict[str, Any]]:
    """The rows of a metrics log (JSON lines, as learn.trainlog.MetricsLog writes them); a blank line, or one being
    written or cut by a kill, is passed over, not an error."""
    rows = []
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _finite(value: Any) -> bool:
    """A number JSON can carry: a diverged run's NaN or infinity is left out of the series."""
    return isinstance(value, int | float) and math.isfinite(value)


def thinned(series: Series, at_most: int) -> Series:
    """At most `at_most` points of `series`, evenly spaced, the last always kept: enough to draw, small to send."""
    if len(series) <= at_most:
        return series
    step = len(series) / (at_most - 1)
    return [series[int(i * step)] for i in range(at_most - 1)] + [series[-1]]
