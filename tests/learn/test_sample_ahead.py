"""The served version's evaluation answers, sampled while the learner waits, are those the next round reads: the
round that replaces it samples only the new version."""

from pathlib import Path
from typing import Any

import pytest

from deploy.settings import load_settings
from learn import policy_eval, ppo
from learn.policy_eval import Caches
from learn.ppo_run import RoundConfig
from learn.rounds import PPOOptions, answers_ahead, ppo_round
from tests.learn.test_ppo_round import make_data_dir


def test_answers_sampled_ahead_are_the_ones_the_round_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_max_new_tokens=6, learn_ppo_iterations=1)
    config = RoundConfig.from_settings(settings)
    options = PPOOptions(parent="v0001", reward="r0001", prompt_file=tmp_path / "prompts.jsonl", eval_prompts=3)
    assert answers_ahead(settings, options, config)
    assert not answers_ahead(settings, options, config)  # kept: a second wait samples nothing
    kept = (data / "evals" / "answers" / "v0001.json").read_text()

    sampled: list[int] = []
    real = ppo.sample

    def counted(policy: Any, queries: Any, *rest: Any, **named: Any) -> Any:
        sampled.append(len(queries))
        return real(policy, queries, *rest, **named)

    monkeypatch.setattr("learn.policy_eval.sample", counted)
    result = ppo_round(settings, config, options, show_progress=False)
    assert sampled == [3]  # the new version's answers; v0001's were read
    answers = Caches.under(data / "evals").answers.get("v0001", policy_eval.Answers(**_json(kept)).key)
    assert answers is not None and answers.texts[0] == result.before.samples[0]["answer"]
    assert result.before.answers == 3


def _json(text: str) -> dict[str, Any]:
    import json

    found: dict[str, Any] = json.loads(text)
    return found
