"""The learner daemon fed through the real HTTP API of a server process and a real Redis server: rankings in, a
`ready` policy version out, with its evaluation on the card and its progress in `rankloop learn status`."""

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from typer.testing import CliRunner

from deploy.learner_status import read_status
from deploy.registry import Registry
from deploy.settings import load_settings
from learn.daemon import Learner
from rankloop.cli import app
from tests.learn.served import PROMPTS


def test_rankings_through_the_api_become_a_ready_version(ranked: tuple[Path, redis.Redis]) -> None:
    data, client = ranked
    runner = CliRunner()
    settings = load_settings(
        learn_min_rankings=PROMPTS,
        learn_min_rm_accuracy=0.0,
        learn_min_rm_heldout_pairs=0,
        learn_ppo_iterations=2,
        learn_prompts_per_iteration=4,
        learn_max_new_tokens=8,
        learn_threads=1,
    )
    learner = Learner(settings, client)
    assert learner.tick() == "ready v0002"

    registry = Registry(client)
    info = registry.show("v0002")
    assert (info.state, info.parent, info.made_by) == ("ready", "v0001", "ppo")
    assert registry.current()[0] == "v0001"  # auto-promotion is off: an operator decides
    assert info.card["reward_model"] == "r0001" and info.card["iterations"] == 2
    assert set(info.card["eval"]) == {"before", "after", "reference_ptx_loss"}
    assert info.card["eval"]["after"]["answers"] > 0 and "empty" in info.card["eval"]["after"]
    # PPO took the answers users ranked as rollouts (those of the held-out prompts excepted), and was judged on
    # the rankings it did not train on.
    served = int(info.card["rollouts"].split()[0])
    assert 0 < served < PROMPTS and info.card["rollouts"].endswith("ranked comparisons v0001 wrote")
    assert set(info.card["agreement"]) == {
        "agreement",
        "agreement_pairs",
        "agreement_detrended",
        "agreement_per_token",
        "agreement_reference",
        "agreement_groups",
        "agreement_sum_low",
        "agreement_per_token_low",
        "agreement_reference_low",
    }
    # The first round's parent is the reference: the two readings are one.
    figures = info.card["agreement"]
    assert figures["agreement_pairs"] > 0 and figures["agreement_reference"] == figures["agreement_per_token"]
    # Each held-out ranking gives one to C(K,2) pairs.
    assert 0 < figures["agreement_groups"] <= figures["agreement_pairs"]
    assert info.card["agreement_by"] == "per_token"
    rm_card = json.loads((data / "reward_models" / "r0001" / "card.json").read_text())
    assert rm_card["details"]["prompts"] + rm_card["details"]["held_out_prompts"] == PROMPTS

    status = read_status(client)
    assert status is not None and status["phase"] == "waiting"
    assert status["last_round"]["version"] == "v0002" and status["last_round"]["outcome"] == "ready"
    shown = runner.invoke(app, ["learn", "status", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["last_round"]["version"] == "v0002"

    assert learner.tick() == "waiting"  # nothing new since r0001
    assert read_status(client)["detail"] == f"0 of {PROMPTS} new rankings needed for a round"  # type: ignore[index]

    # An unfinished round the daemon cannot continue (another command's, other settings) is set aside, not
    # retried at every poll: the daemon would never learn again.
    checkpoint = data / "checkpoints" / "ppo.ckpt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"parent": "v0001", "reward": "r0001", "iterations": 99}}, checkpoint)
    assert learner.tick() == "set aside"
    assert not checkpoint.exists() and len(list(checkpoint.parent.glob("ppo.*.set-aside.ckpt"))) == 1
    assert learner.tick() == "waiting"


def test_no_ppo_round_on_a_reward_model_judged_on_too_few_pairs(ranked: tuple[Path, redis.Redis]) -> None:
    data, client = ranked
    settings = load_settings(
        learn_min_rankings=PROMPTS,
        learn_min_rm_accuracy=0.0,
        learn_min_rm_heldout_pairs=10**6,
        learn_rm_max_rankings=10,
    )
    learner = Learner(settings, client)
    assert learner.tick() == "reward model below the gate"

    card = json.loads((data / "reward_models" / "r0001" / "card.json").read_text())
    # A backlog beyond learn_rm_max_rankings: the round trained on the newest 10 and passed over the rest.
    details = card["details"]
    assert details["prompts"] == 10 and details["skipped_prompts"] > 0
    assert details["prompts"] + details["skipped_prompts"] + details["held_out_prompts"] == PROMPTS
    pairs = card["details"]["eval"]["pairs"]
    assert pairs == 3 * card["details"]["held_out_prompts"]  # K=3, strictly ranked
    status = read_status(client)
    assert status is not None and status["last_round"] == {"reward_model": "r0001", "outcome": "rm below gate"}
    assert status["detail"].endswith(f"on {pairs} pairs, fewer than 1000000: no PPO round; waiting for rankings")
    assert [info.version for info in Registry(client).versions()] == ["v0001"]
    assert not (data / "checkpoints" / "ppo.ckpt").exists()
    assert learner.tick() == "waiting"  # the rankings went into r0001: the next round waits for new ones


def test_a_waiting_learner_samples_the_served_versions_answers_once(
    ranked: tuple[Path, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    from learn import daemon, rounds

    data, client = ranked
    settings = load_settings(learn_min_rankings=PROMPTS + 1, learn_max_new_tokens=8, learn_threads=1)
    looked: list[str] = []
    real = rounds.answers_ahead

    def counted(settings: Any, options: Any, config: Any, starting: Any) -> str:
        looked.append(real(settings, options, config, starting))
        return looked[-1]

    monkeypatch.setattr("learn.daemon.answers_ahead", counted)
    learner = Learner(settings, client)
    waiting = f"{PROMPTS} of {PROMPTS + 1} new rankings needed for a round"
    # 4 of the 40 prompts are held out for evaluation, of the 16 it takes: the next held-out one would change it.
    # Only a new ranking could: the second look, with none, does not read the data again.
    assert learner.tick() == learner.tick() == "waiting"
    assert looked == ["unsettled"] and not (data / "evals" / "answers").exists()
    assert read_status(client)["detail"] == waiting  # type: ignore[index]

    real_options = daemon.ppo_options
    monkeypatch.setattr(daemon, "ppo_options", lambda *a: replace(real_options(*a), eval_prompts=4))
    assert learner.tick() == learner.tick() == "waiting"
    assert looked[1:] == ["sampled"]  # once for the served version, not at every look at the data
    kept = json.loads((data / "evals" / "answers" / "v0001.json").read_text())
    assert len(kept["texts"]) == 4  # one answer to each held-out prompt: the next round reads them
    assert read_status(client)["detail"] == waiting  # type: ignore[index]


def test_a_round_the_gate_could_not_decide_is_built_on_by_the_next(
    ranked: tuple[Path, redis.Redis], server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RANKLOOP_LEARN_BUILD_ON=undecided through the daemon's ticks: the second round trains v0002 further on the
    comparisons v0001 (still served) wrote, and is judged against v0001."""
    from learn import daemon
    from learn.gate import Gate
    from tests.learn.served import rank_answers

    _, client = ranked
    # The tiny random model's agreement is a coin's: the gate's verdict is scripted, want of evidence alone.
    monkeypatch.setattr(daemon, "promotion_gate", lambda *a: Gate(False, "not beyond chance", undecided=True))
    settings = load_settings(
        learn_min_rankings=PROMPTS // 2,
        learn_min_rm_accuracy=0.0,
        learn_min_rm_heldout_pairs=0,
        learn_ppo_iterations=1,
        learn_prompts_per_iteration=4,
        learn_max_new_tokens=8,
        learn_threads=1,
        learn_auto_promote=True,
        learn_build_on="undecided",
    )
    learner = Learner(settings, client)
    assert learner.tick() == "ready v0002"
    rank_answers(server[0], PROMPTS // 2)
    consumed = CliRunner().invoke(app, ["feedback", "consume", "--once"])
    assert consumed.exit_code == 0, consumed.output
    assert learner.tick() == "ready v0003"
    info = Registry(client).show("v0003")
    assert info.parent == "v0002" and info.card["replaces"] == "v0001"
    assert info.card["rollouts"].endswith("ranked comparisons v0001 wrote")
    assert Registry(client).current()[0] == "v0001"
    status = read_status(client)
    assert status is not None and status["last_round"]["replaces"] == "v0001"
    assert status["detail"] == "v0003 ready (not beyond chance; the next round builds on it)"
