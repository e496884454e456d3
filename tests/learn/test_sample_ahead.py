"""The served version's evaluation answers, sampled while the learner waits, are those the next round reads: the
round that replaces it samples only the new version. While the prompts the round would take may still change,
nothing is sampled."""

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deploy.settings import load_settings
from feedback.dataset import Dataset
from learn import ppo
from learn.ppo_run import RoundConfig
from learn.rounds import PPOOptions, answers_ahead, ppo_round
from tests.learn.events import ranking_event
from tests.learn.test_ppo_round import make_data_dir


def test_answers_sampled_ahead_are_the_ones_the_round_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_max_new_tokens=6, learn_ppo_iterations=1, learn_threads=1)
    config = RoundConfig.from_settings(settings)
    options = PPOOptions(parent="v0001", reward="r0001", eval_prompts=3)
    rng = random.Random(0)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(60)])  # users' prompts q0..q59: 3 held out
    assert answers_ahead(settings, options, config) == "sampled"
    assert answers_ahead(settings, options, config) == "kept"  # a second wait samples nothing
    kept = json.loads((data / "evals" / "answers" / "v0001.json").read_text())

    sampled: list[int] = []
    real = ppo.sample

    def counted(policy: Any, queries: Any, *rest: Any, **named: Any) -> Any:
        sampled.append(len(queries))
        return real(policy, queries, *rest, **named)

    monkeypatch.setattr("learn.policy_eval.sample", counted)
    result = ppo_round(settings, config, options, show_progress=False)
    assert sampled == [3]  # the new version's answers; v0001's were read
    assert result.before.answers == 3 and kept["texts"][0] == result.before.samples[0]["answer"]


def test_nothing_is_sampled_while_the_evaluation_prompts_may_change(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_max_new_tokens=6)
    config = RoundConfig.from_settings(settings)
    # With a prompt file, the first held-out prompts users ask would go before the file's.
    with_file = PPOOptions(parent="v0001", prompt_file=tmp_path / "prompts.jsonl", eval_prompts=3)
    assert answers_ahead(settings, with_file, config) == "unsettled"
    rng = random.Random(0)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(20)])  # 2 held-out prompts of users': fewer than 3
    assert answers_ahead(settings, replace(with_file, prompt_file=None), config) == "unsettled"
    assert not (data / "evals" / "answers" / "v0001.json").exists()
