"""A PPO round on the tiny random llama: the value model starts as the reward model, prompts come from every
supported shape, and a round SIGKILLed mid-way and run again ends exactly where an uninterrupted one does."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deploy.model_import import import_model
from deploy.model_store import Card, ModelStore
from deploy.settings import load_settings
from feedback.dataset import Dataset
from feedback.events import RankingEvent
from learn import rounds
from learn.data import DataError
from learn.ppo import Rollouts, pack
from learn.ppo_run import CheckpointMismatch, RoundConfig, value_model
from learn.prompts import messages_of, prompts_from_file, served_from_events
from learn.reward_model import Norm, RewardScorer, load_reward_model, save_reward_model
from learn.rm_data import group_from_event, is_held_out, is_rm_held_out, prompt_key
from learn.rounds import PPOOptions, ppo_round
from learn.weights import load_causal_lm
from tests.learn.events import ranking_event
from tests.tiny import tiny_llama_folder, tiny_tokenizer

RM_HELD_OUT = 0.2  # r0001's held-out share, as the learner makes reward models by default
REPO = Path(__file__).resolve().parents[2]


def make_data_dir(root: Path, offset: float = 0.25, policy: Path | None = None) -> Path:
    """A data dir with the tiny llama (or the model at `policy`) as v0001 and a reward model r0001 on its backbone
    (random head)."""
    data = root / "data"
    store = ModelStore(data / "models")
    import_model(store, policy or tiny_llama_folder(root / "src"))
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(store.path("v0001"))
    rewards = ModelStore(data / "reward_models", prefix="r")
    save_reward_model(
        model,
        tokenizer,
        rewards,
        Card(version="r0001", parent="v0001", made_by="reward_model", details={"held_out": RM_HELD_OUT}),
        Norm(offset, 0.0, "test"),
    )
    prompts = root / "prompts.jsonl"
    rows = [json.dumps({"prompt": f"write a short poem about the sea {i}"}) for i in range(30)]
    prompts.write_text("\n".join(rows) + "\n")
    return data


def test_the_value_model_starts_as_the_normalised_reward(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path, offset=0.25)
    scorer = RewardScorer(data / "reward_models" / "r0001")
    value = value_model(scorer, split=0)
    # The value of the state before answer token j is the normalised reward of the prompt and tokens 0..j-1.
    rollouts = Rollouts([[5, 17, 42], [8]], [[99, 7], [9, 10, 11]], [False, False])
    packed = pack(rollouts, 0)
    prefixes = [[5, 17, 42], [5, 17, 42, 99], [8], [8, 9], [8, 9, 10]]
    expected = scorer.sequences(prefixes)  # raw score at each prefix's last token minus the offset 0.25
    with torch.no_grad():
        values = value(value.features(packed))
    assert torch.allclose(values[packed.mask.bool()], expected, atol=1e-5)
    # The zero-reward control's value model knows nothing of the reward model: every value starts at 0.
    control = value_model(scorer, split=0, from_reward=False)
    with torch.no_grad():
        assert torch.equal(control(control.features(packed)), torch.zeros_like(values))
    # The reward of whole answers, read from the same packing, is the scorer's on the plain sequences.
    whole = scorer.sequences([[5, 17, 42, 99, 7], [8, 9, 10, 11]])
    assert torch.allclose(scorer(rollouts, packed, None), whole, atol=1e-5)
    assert not any(p.requires_grad for p in value.backbone.parameters())  # the reward model's features stay


def test_prompts_are_read_from_every_shape() -> None:
    assert messages_of({"prompt": "hi"}, "f") == [{"role": "user", "content": "hi"}]
    assert messages_of({"instruction": "add", "input": "1 2"}, "f") == [{"role": "user", "content": "add\n\n1 2"}]
    assert messages_of({"instruction": "add", "instances": [{"input": "3", "output": "x"}]}, "f") == [
        {"role": "user", "content": "add\n\n3"}
    ]
    assert messages_of({"turns": ["first", "second"]}, "f") == [{"role": "user", "content": "first"}]
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert messages_of({"messages": chat}, "f") == chat[:1]
    with pytest.raises(DataError, match="line 3: expected `messages`"):
        messages_of({"question": "?"}, "line 3")


def test_long_prompts_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "the quick brown fox " * 40}) + "\n")
    prompts = prompts_from_file(path, tiny_tokenizer(), max_len=32)
    assert [p.messages[0]["content"] for p in prompts] == ["hi"]


def test_served_rollouts_are_answers_sampled_from_the_plain_distribution() -> None:
    rng = random.Random(0)
    events = [RankingEvent.model_validate_json(ranking_event(i, rng)[2]) for i in range(7)]
    events[1].comparison.sampling = {"temperature": 0.7, "top_p": 1.0}
    events[2].comparison.sampling = {"temperature": 1.0, "top_p": 0.9}
    events[3].comparison.sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64}
    events[4].comparison.sampling = {"temperature": 1.0, "presence_penalty": 0.5}
    events[5].comparison.sampling = {"temperature": 1.0, "frequency_penalty": -0.1}
    events[6].comparison.sampling = {"temperature": 1.0, "json": True}  # a grammar masked the distribution
    events.append(events[0])  # ranked twice: one rollout
    assert [s.comparison_id for s in served_from_events(events, max_prompt_len=64)] == ["c0", "c3"]


def test_a_canarys_comparison_is_a_rollout_of_each_version_that_wrote_in_it() -> None:
    event = RankingEvent.model_validate_json(ranking_event(0, random.Random(0))[2])
    event.comparison.candidates[1].policy_version = "v0009"  # the canary wrote candidate 1
    [ours, theirs] = served_from_events([event], max_prompt_len=64)
    candidates = event.comparison.candidates
    assert (ours.policy_version, ours.answers) == ("v0001", [candidates[0].token_ids])
    assert (theirs.policy_version, theirs.answers) == ("v0009", [candidates[1].token_ids])
    assert ours.comparison_id == theirs.comparison_id == "c0"
    # For the reward model it is one ranking like any other, but no one version wrote it (the normalisation
    # averages the reference's own answers).
    group = group_from_event("1000-0", event, 64)
    assert group is not None and group.policy_version is None and group.tiers == event.ranking


def test_a_checkpoint_of_another_round_is_refused(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_threads=1)
    checkpoint = data / "checkpoints" / "ppo.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"meta": {"parent": "v0009"}}, checkpoint)
    options = PPOOptions(prompt_file=tmp_path / "prompts.jsonl")
    with pytest.raises(CheckpointMismatch, match=r"differs in .*parent.*--fresh"):
        ppo_round(settings, RoundConfig(iterations=1), options, show_progress=False)


def _ppo(data: Path, root: Path, iterations: int, bf16: bool = False) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RANKLOOP_DATA_DIR": str(data),
        "RANKLOOP_LEARN_THREADS": "1",
        "RANKLOOP_LEARN_BF16": str(bf16).lower(),
    }
    argv = [
        sys.executable,
        "-m",
        "rankloop",
        "learn",
        "ppo",
        "--iterations",
        str(iterations),
        "--prompts-per-iteration",
        "4",
        "--max-new-tokens",
        "6",
        "--prompts",
        str(root / "prompts.jsonl"),
    ]
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _last_steps(data: Path) -> dict[int, dict[str, float]]:
    lines = (data / "runs" / "v0001-ppo-r0001.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}  # a step logged twice: the later line wins


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_round_killed_mid_way_resumes_to_the_same_result(tmp_path: Path, bf16: bool) -> None:
    iterations = 6
    whole = make_data_dir(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same random models on both sides
    broken = tmp_path / "b" / "data"
    assert _ppo(whole, tmp_path / "a", iterations, bf16).wait(timeout=300) == 0

    victim = _ppo(broken, tmp_path / "b", iterations, bf16)
    log = broken / "runs" / "v0001-ppo-r0001.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert victim.poll() is None and time.monotonic() < deadline, "the round ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (broken / "models" / "v0002").exists()
    resumed = _ppo(broken, tmp_path / "b", iterations, bf16)
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert "resumed at iteration" in output

    a, b = _last_steps(whole), _last_steps(broken)
    for figure in ("reward", "kl_per_answer", "policy_loss", "value_loss", "beta"):
        assert a[iterations][figure] == b[iterations][figure], figure
    weights_a = load_file(whole / "models" / "v0002" / "model.safetensors")
    weights_b = load_file(broken / "models" / "v0002" / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not (broken / "checkpoints" / "ppo.ckpt").exists()  # a finished round leaves no checkpoint behind
    assert ModelStore(whole / "models").card("v0002").details["bf16"] is bf16
    assert a[iterations]["kl_per_answer"] != 0.0  # the policy moved away from the reference (in bf16 too)


def test_a_resumed_round_trains_on_the_prompts_it_started_with(tmp_path: Path) -> None:
    """Users keep ranking while a round runs or the stack is down; the resumed round keeps to the data it started
    with (it used to refuse its own checkpoint: "differs in prompts"), and the next round sees everything."""
    data = make_data_dir(tmp_path)
    settings, rng = load_settings(data_dir=data, learn_threads=1), random.Random(0)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(12)])
    config = RoundConfig(iterations=2, prompts_per_iteration=4, max_new_tokens=4)

    def stop(iteration: int, of: int, figures: dict[str, float]) -> None:
        raise KeyboardInterrupt  # after the first iteration's checkpoint, as stopping the stack would

    with pytest.raises(KeyboardInterrupt):
        ppo_round(settings, config, PPOOptions(), on_step=stop, show_progress=False)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(12, 20)])
    resumed = ppo_round(settings, config, PPOOptions(), show_progress=False)
    card = ModelStore(data / "models").card(resumed.version)
    assert resumed.resumed_at == 1
    assert card.details["train_prompts"] + card.details["held_out_prompts"] == usable(12)
    # The judgement is the exception: it takes the held-out rankings there are when it judges. Of q0..q19, q9, q12
    # and q16 are the reward model's held-out prompts (a fifth), and q12 and q16 arrived while the round was
    # stopped: all three pairs judged the round.
    assert resumed.agreement.pairs == 3 and card.details["agreement"]["agreement_pairs"] == 3
    # From the reference, the step from the parent is the KL to the reference, read on the same answers by the
    # judgement's pass (the parent model, batches by length) as by the evaluation's (the reference, as sampled).
    assert resumed.after.parent_kl == pytest.approx(resumed.after.kl, rel=1e-4, abs=1e-5)
    assert card.details["eval"]["after"]["parent_kl"] == resumed.after.parent_kl != 0.0
    # From a parent that is not the reference, the step is read against the parent: not the KL to the reference.
    onward = ppo_round(settings, config, PPOOptions(parent=resumed.version), show_progress=False)
    assert math.isfinite(onward.after.parent_kl) and onward.after.parent_kl != pytest.approx(onward.after.kl, rel=0.01)
    following = ppo_round(settings, config, PPOOptions(parent="v0001"), show_progress=False)
    card = ModelStore(data / "models").card(following.version)
    assert following.resumed_at == 0
    assert card.details["train_prompts"] + card.details["held_out_prompts"] == usable(20)
    assert usable(20) < 20  # one of them is held out for the reward model: left out of PPO's training prompts


def test_a_round_built_on_a_version_never_served_is_judged_against_the_served_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain (settings.learn_build_on): the round trains v0002 further, which users were never served. Its
    rollouts are the comparisons v0001 (served) wrote, its `before` is v0001's evaluation and its agreement with
    held-out rankings is read against v0001, as the version it would replace; its step is read against v0002."""
    data = make_data_dir(tmp_path)
    settings, rng = load_settings(data_dir=data, learn_threads=1), random.Random(0)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(40)])
    config = RoundConfig(iterations=1, prompts_per_iteration=4, max_new_tokens=4)
    first = ppo_round(settings, config, PPOOptions(), show_progress=False)
    judged_against: list[torch.nn.Module] = []
    judge = rounds.judge_on_held_out_rankings

    def spy(settings: Any, models: Any, parent: Any, *rest: Any) -> Any:
        judged_against.append(parent)
        return judge(settings, models, parent, *rest)

    monkeypatch.setattr(rounds, "judge_on_held_out_rankings", spy)
    chained = ppo_round(settings, config, PPOOptions(parent=first.version, replaces="v0001"), show_progress=False)
    store = ModelStore(data / "models")
    card = store.card(chained.version)
    assert (card.parent, card.details["replaces"], chained.replaces) == (first.version, "v0001", "v0001")
    assert (
        card.details["rollouts"] == store.card(first.version).details["rollouts"]
    )  # "N ranked comparisons v0001 wrote"
    assert card.details["rollouts"].endswith("v0001 wrote")
    # The version it would replace, as the first round measured it (the same answers, reward model and texts).
    assert chained.before == first.before
    # Judged against v0001's weights, not v0002's.
    probe = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        seen = judged_against[0](input_ids=probe).logits
        served = load_causal_lm(store.path("v0001"))[0](input_ids=probe).logits
        parent = load_causal_lm(store.path(first.version))[0](input_ids=probe).logits
    assert torch.allclose(seen, served, atol=1e-5) and not torch.allclose(seen, parent, atol=1e-3)
    # Against the reference (v0001) the two readings of agreement are then one.
    assert chained.agreement.per_token == chained.agreement.reference
    # The step is from its parent: not the KL to v0001.
    assert math.isfinite(chained.after.parent_kl) and chained.after.parent_kl != pytest.approx(
        chained.after.kl, rel=0.01
    )


def usable(n: int) -> int:
    """Of ranking_event's prompts q0..q(n-1): the evaluation's held-out ones, and the training ones that are not the
    reward model's held-out prompts (their rankings judge the round, so PPO never trains on them)."""
    fraction = PPOOptions().held_out
    keys = [prompt_key([{"role": "user", "content": f"q{i}"}]) for i in range(n)]
    return sum(is_held_out(k, fraction) or not is_rm_held_out(k, RM_HELD_OUT) for k in keys)


def test_the_reward_model_gate_wants_accuracy_measured_on_enough_pairs() -> None:
    from learn.gate import rm_gate
    from learn.reward_model import Evaluation

    def ev(accuracy: float, pairs: int) -> Evaluation:
        return Evaluation(accuracy, 0.5, 0.0, 1.0, groups=pairs // 6, pairs=pairs)

    assert rm_gate(ev(0.75, 24), 0.6, 20).passed
    few = rm_gate(ev(0.875, 8), 0.6, 20)  # 7 of 8 right: high, but on too little to tell from luck
    assert not few.passed and few.why == "held-out accuracy 0.875 measured on 8 pairs, fewer than 20"
    low = rm_gate(ev(0.55, 40), 0.6, 20)
    assert not low.passed and low.why == "held-out accuracy 0.550 < 0.6 (40 pairs)"
    assert not rm_gate(ev(float("nan"), 0), 0.0, 0).passed  # nothing held out yet: never a PPO round
    assert rm_gate(ev(0.6, 20), 0.6, 20).passed  # both bounds are inclusive


def test_the_daemons_round_follows_the_operators_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("RANKLOOP_")]:
        monkeypatch.delenv(name)  # the embedded defaults, whatever the machine running the tests sets
    settings = load_settings(
        data_dir=tmp_path,
        learn_ppo_iterations=5,
        learn_ppo_epochs=3,
        learn_ppo_lr=3e-4,
        learn_prompts_per_iteration=12,
        learn_max_new_tokens=48,
        learn_ptx_coef=0.25,
        learn_seed=7,
    )
    config = RoundConfig.from_settings(settings)
    assert (config.iterations, config.ppo.epochs, config.prompts_per_iteration, config.max_new_tokens) == (5, 3, 12, 48)
    assert (config.lr, config.value_lr, config.ppo.ptx_coef, config.seed, config.ppo.seed) == (3e-4, 3e-4, 0.25, 7, 7)
    # The embedded defaults are the settings' alone: a config made without settings is the default settings' one.
    assert RoundConfig() == RoundConfig.from_settings(load_settings(data_dir=tmp_path))
    assert RoundConfig().ppo.epochs == 2 and RoundConfig().iterations == 4
    # A flag changes what it names and nothing else; the round's seed is the mini-batches' seed too.
    changed = config.changed(0.5, iterations=None, seed=3, kl_target=2.0)
    assert (changed.iterations, changed.ppo.ptx_coef, changed.ppo.epochs) == (5, 0.5, 3)
    assert (changed.seed, changed.ppo.seed, changed.kl_target) == (3, 3, 2.0)
    assert (changed.ppo.advantage, config.changed(advantage="rloo").ppo.advantage) == ("gae", "rloo")
    assert (changed.ppo.ptx_loss, config.changed(ptx_loss="lm").ppo.ptx_loss) == (None, "lm")


def test_the_daemons_reward_model_round_follows_the_operators_settings(tmp_path: Path) -> None:
    from learn.daemon import rm_options

    settings = load_settings(
        data_dir=tmp_path,
        learn_rm_epochs=3,
        learn_rm_lr=5e-5,
        learn_bf16=True,
        learn_rm_train_layers=4,
        learn_rm_held_out=0.3,
    )
    options = rm_options(settings, "r0002")
    assert (options.resume_from, options.epochs, options.lr, options.bf16) == ("r0002", 3, 5e-5, True)
    assert options.train_layers == 4  # the reward model's own, not PPO's learn_train_layers
    assert options.held_out is None  # continuing r0002: its chain's share, whatever the setting says now
    assert rm_options(settings, None).held_out == 0.3  # a new reward model: the setting's
    default = rm_options(load_settings(data_dir=tmp_path), None)
    assert (default.epochs, default.max_train, default.train_layers) == (1, 64, 2)  # the defaults
    assert default.held_out == RM_HELD_OUT  # a new reward model's share: the setting's default
