"""rankloop's own prompt set: what simulated users ask and versions are judged on in a clone that has nothing else."""

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lab.simulate import split
from learn.prompts import DEFAULT_PROMPTS, conversations
from rankloop.cli import app
from rankloop.loop_cli import _prompts
from tests.tiny import tiny_versions_store


def test_the_shipped_prompts_are_varied_and_have_a_held_out_split() -> None:
    rows = [json.loads(line) for line in DEFAULT_PROMPTS.read_text().splitlines()]
    prompts = [row["prompt"] for row in rows]
    assert len(prompts) == len(set(prompts)) >= 300
    assert len({row["category"] for row in rows}) >= 10
    assert all(1 <= len(p.split()) <= 60 for p in prompts)
    train, held = split(list(conversations(DEFAULT_PROMPTS)))
    # The learner's own split (10% by hash): enough held-out prompts for 100 judged pairs at 4 samples each.
    assert len(held) >= 25 and len(train) + len(held) == len(prompts)


def test_simulate_and_eval_default_to_them() -> None:
    assert _prompts(None) == list(conversations(DEFAULT_PROMPTS))


def test_eval_runs_on_its_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `rankloop eval vA vB` with no options: the shipped prompts' held-out part, the server's answer length.
    tiny_versions_store(tmp_path)
    monkeypatch.setenv("RANKLOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RANKLOOP_DEFAULT_MAX_TOKENS", "96")
    seen: dict[str, Any] = {}

    def compare(*args: Any) -> None:
        seen["prompts"], seen["samples"], seen["limit"] = len(args[5]), args[6], args[7]
        raise SystemExit(0)

    monkeypatch.setattr("lab.judge.compare", compare)
    result = CliRunner().invoke(app, ["eval", "v0002", "v0001", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"prompts": len(split(list(conversations(DEFAULT_PROMPTS)))[1]), "samples": 4, "limit": 96}
