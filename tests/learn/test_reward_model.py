"""The reward model on the tiny random llama: it learns, its K-wise batch equals the pairwise computation, it
round-trips through the store exactly, and it trains from the feedback dataset incrementally."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deploy.model_store import Card, ModelStore
from feedback.dataset import Dataset
from learn.loop import LoopConfig
from learn.ppo import Rollouts, pack
from learn.reward_model import (
    Norm,
    RewardScorer,
    group_loss,
    load_reward_model,
    read,
    readout_of,
    reference_norm,
    save_reward_model,
    score_ids,
    train_reward_model,
)
from learn.rm_data import RankedGroup, hh_groups, parse_hh, prompt_key, split
from learn.trainlog import MetricsLog
from rankloop.cli import app
from tests.learn.events import BAD, GOOD, MID, ranking_event


def separable_groups(n: int, seed: int = 0, anywhere: bool = False) -> list[RankedGroup]:
    """Prompts with 3 answers ranked by a marker token, at each answer's end or (`anywhere`) at a random place."""
    rng = random.Random(seed)
    groups = []
    for p in range(n):
        prompt = [rng.randrange(10, 90) for _ in range(rng.randrange(3, 8))]
        endings = [GOOD, MID, BAD]
        rng.shuffle(endings)
        answers, lens = [], []
        for end in endings:
            body = [rng.randrange(10, 90) for _ in range(rng.randrange(1, 5))]
            at = rng.randrange(len(body) + 1) if anywhere else len(body)
            answers.append(prompt + body[:at] + [end] + body[at:])
            lens.append(len(body) + 1)
        order = sorted(range(3), key=lambda i: [GOOD, MID, BAD].index(endings[i]))
        groups.append(RankedGroup(f"p{p:03d}", answers, [[i] for i in order], "v0001", answer_lens=tuple(lens)))
    return groups


def test_hh_dialogues_become_messages() -> None:
    text = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bye"
    assert parse_hh(text) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]


def test_the_split_is_by_prompt_and_stable() -> None:
    groups = [
        RankedGroup(prompt_key([{"role": "user", "content": str(i)}]), [[1], [2]], [[0], [1]]) for i in range(400)
    ]
    train, held = split(groups, 0.25)
    assert 60 < len(held) < 140 and len(train) + len(held) == 400
    assert split(groups[:200], 0.25)[1] == [g for g in held if g in groups[:200]]  # a prompt keeps its side


def test_learns_a_separable_preference_to_full_held_out_accuracy(tiny_store: ModelStore) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_store.path("v0001"), readout="last")
    groups = separable_groups(60)
    train, held = groups[:48], groups[48:]
    config = LoopConfig(epochs=6, batch_size=4, lr=2e-3)
    result, evaluation = train_reward_model(
        model, tokenizer, train, held, config, MetricsLog(None), show_progress=False
    )
    assert result.steps == 72
    assert evaluation.accuracy == 1.0 and evaluation.groups == 12
    assert evaluation.pairs == 36  # 12 prompts x C(3,2) pairs, no ties


@pytest.mark.parametrize("readout", ["mean", "lme"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_a_pooled_readout_learns_a_marker_said_anywhere_in_the_answer(
    tiny_store: ModelStore, shuffled: bool, readout: str
) -> None:
    # A random 2-layer model (SmolLM2's curves are in BENCHMARKS.md). Over six draws of its weights, mean: 0.81-0.97
    # of the 36 held-out pairs, lme: 0.94-1.0; with the rankings shuffled among a prompt's answers there is nothing
    # to learn and it stays well under the trained figure (0.33-0.58). The test's draw (seed 0): 0.83 and 1.0.
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_store.path("v0001"), readout=readout)
    groups = separable_groups(60, anywhere=True)
    rng = random.Random(1)
    train = [replace(g, tiers=rng.sample(g.tiers, 3)) for g in groups[:48]] if shuffled else groups[:48]
    _, evaluation = train_reward_model(
        model,
        tokenizer,
        train,
        groups[48:],
        LoopConfig(epochs=6, batch_size=4, lr=2e-3),
        MetricsLog(None),
        show_progress=False,
    )
    assert evaluation.pairs == 36
    assert (evaluation.accuracy < 0.65) if shuffled else (evaluation.accuracy >= 0.78)


def test_kwise_batch_gives_the_loss_and_gradients_of_explicit_pairs(tiny_store: ModelStore) -> None:
    model, tokenizer = load_reward_model(tiny_store.path("v0001"))
    model.float()
    pad = int(tokenizer.pad_token_id)
    groups = separable_groups(3, seed=1)
    groups[1] = RankedGroup(groups[1].prompt_key, groups[1].answers, [[0], [1, 2]])  # a tie: 2 pairs, not 3
    loss, _, _ = group_loss(model, groups, pad)
    kwise_grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    per_prompt = []
    for g in groups:  # the way a pairwise trainer does it: two forwards per pair
        tier = {i: t for t, members in enumerate(g.tiers) for i in members}

        def score(i: int, g: RankedGroup = g) -> torch.Tensor:
            return score_ids(model, [g.answers[i]], pad)

        pair_losses = [
            -torch.nn.functional.logsigmoid(score(w) - score(lo)) for w in tier for lo in tier if tier[w] < tier[lo]
        ]
        per_prompt.append(torch.cat(pair_losses).mean())
    explicit = torch.stack(per_prompt).mean()
    explicit_grads = torch.autograd.grad(explicit, [p for p in model.parameters() if p.requires_grad])
    assert loss.item() == pytest.approx(explicit.item(), abs=1e-5)
    for a, b in zip(kwise_grads, explicit_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_save_and_load_round_trip_scores_exactly_with_the_offset(tiny_store: ModelStore, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_store.path("v0001"))
    groups = separable_groups(8)
    train_reward_model(
        model, tokenizer, groups, [], LoopConfig(batch_size=4, lr=1e-3), MetricsLog(None), show_progress=False
    )
    pad = int(tokenizer.pad_token_id)
    norm = reference_norm(model, groups, pad, "v0001")
    assert norm.basis == "reference answers"
    rewards = ModelStore(tmp_path / "rewards", prefix="r")
    folder = save_reward_model(model, tokenizer, rewards, Card("r0001", "v0001", "reward_model"), norm)
    sequences = [a for g in groups for a in g.answers]
    with torch.no_grad():
        before = score_ids(model, sequences, pad)
    scorer = RewardScorer(folder)
    after = scorer.sequences(sequences)
    assert torch.equal(after, before - norm.offset)
    assert float(after.mean()) == pytest.approx(0.0, abs=1e-5)  # the reference's answers average 0
    # Every answer here is the reference's: the spread is their scores' standard deviation, kept with the model.
    assert norm.spread == pytest.approx(float(before.std()), rel=1e-5)
    assert norm.spread > 0
    assert scorer.norm == norm
    assert rewards.versions() == ["r0001"]


def test_a_mean_readout_is_kept_with_the_model_and_read_the_same_from_a_packed_batch(
    tiny_store: ModelStore, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_store.path("v0001"), dtype=torch.float32, readout="mean")
    torch.nn.init.normal_(model.score.weight)  # a head far from zero, so that the readouts differ
    pad = int(tokenizer.pad_token_id)
    rewards = ModelStore(tmp_path / "rewards", prefix="r")
    folder = save_reward_model(
        model, tokenizer, rewards, Card("r0001", "v0001", "reward_model"), Norm(0.5, 1.0, "test")
    )
    scorer = RewardScorer(folder)
    assert readout_of(scorer.model) == "mean"
    assert readout_of(load_reward_model(tiny_store.path("v0001"))[0]) == "last"  # a policy: none set
    # Prompts longer and shorter than their answers, packed with padding: the score is the mean of the head over
    # every real token of prompt + answer, minus the offset.
    rollouts = Rollouts([[5, 17, 42, 7, 3], [8]], [[99], [9, 10, 11]], [False, False])
    whole = [[5, 17, 42, 7, 3, 99], [8, 9, 10, 11]]
    with torch.no_grad():
        per_token = [model.score(model.model(torch.tensor([s])).last_hidden_state)[0, :, 0] for s in whole]
    by_hand = torch.stack([p.mean() for p in per_token]) - 0.5
    assert torch.allclose(scorer.sequences(whole), by_hand, atol=1e-5)
    for side in ("right", "left"):
        assert torch.allclose(scorer(rollouts, pack(rollouts, pad, side), None), by_hand, atol=1e-5), side
    last = torch.stack([p[-1] for p in per_token]) - 0.5
    assert not torch.allclose(by_hand, last, atol=1e-3)  # the two readouts give different numbers here
    with pytest.raises(ValueError, match="unknown reward-model readout"):
        load_reward_model(tiny_store.path("v0001"), readout="first")


def test_an_lme_readout_pools_the_answer_alone_from_ids_and_from_a_packed_batch(
    tiny_store: ModelStore, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_store.path("v0001"), dtype=torch.float32, readout="lme")
    torch.nn.init.normal_(model.score.weight)
    pad = int(tokenizer.pad_token_id)
    rewards = ModelStore(tmp_path / "rewards", prefix="r")
    folder = save_reward_model(
        model, tokenizer, rewards, Card("r0001", "v0001", "reward_model"), Norm(0.5, 1.0, "test")
    )
    scorer = RewardScorer(folder)
    assert readout_of(scorer.model) == "lme"
    # A prompt longer than its answer and one shorter: log-mean-exp of the head over the answer's tokens only.
    rollouts = Rollouts([[5, 17, 42, 7, 3], [8]], [[99], [9, 10, 11]], [False, False])
    whole = [[5, 17, 42, 7, 3, 99], [8, 9, 10, 11]]
    with torch.no_grad():
        per_token = [model.score(model.model(torch.tensor([s])).last_hidden_state)[0, :, 0] for s in whole]
    answers = [per_token[0][-1:], per_token[1][-3:]]
    by_hand = torch.stack([torch.log(a.exp().mean()) for a in answers]) - 0.5
    assert torch.allclose(scorer.sequences(whole, answer_lens=[1, 3]), by_hand, atol=1e-5)
    for side in ("right", "left"):
        assert torch.allclose(scorer(rollouts, pack(rollouts, pad, side), None), by_hand, atol=1e-5), side
    # Where the answers' lengths are unknown every token is pooled, prompt included: other numbers.
    everything = torch.stack([torch.log(p.exp().mean()) for p in per_token]) - 0.5
    assert torch.allclose(scorer.sequences(whole), everything, atol=1e-5)
    assert not torch.allclose(by_hand, everything, atol=1e-3)


def test_training_and_the_offset_pool_each_answer_where_ppo_does(tiny_store: ModelStore) -> None:
    # The K-wise loss's scores and the reference offset come from the answers alone under lme, as PPO reads them
    # (RewardScorer, the previous test); rankings that do not say where their answers start are refused.
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_store.path("v0001"), dtype=torch.float32, readout="lme")
    torch.nn.init.normal_(model.score.weight)
    pad = int(tokenizer.pad_token_id)
    groups = separable_groups(3, seed=2)
    sequences = [a for g in groups for a in g.answers]
    lens = [n for g in groups for n in g.answer_lens]
    with torch.no_grad():
        answers_only = score_ids(model, sequences, pad, answer_lens=lens)
        _, _, scores = group_loss(model, groups, pad)
        offset = reference_norm(model, groups, pad, "v0001").offset
    assert torch.allclose(scores, answers_only, atol=1e-5)
    assert offset == pytest.approx(float(answers_only.mean()), abs=1e-5)
    assert not torch.allclose(answers_only, score_ids(model, sequences, pad), atol=1e-3)  # prompts pooled too
    unknown = [replace(g, answer_lens=()) for g in groups]
    with pytest.raises(ValueError, match="'lme' readout needs each answer's length"):
        group_loss(model, unknown, pad)
    last, _ = load_reward_model(tiny_store.path("v0001"), dtype=torch.float32)
    group_loss(last, unknown, pad)  # the last token needs no lengths


def test_hh_pairs_know_where_their_answers_start(tmp_path: Path, tiny_store: ModelStore) -> None:
    _, tokenizer = load_reward_model(tiny_store.path("v0001"))
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (group,) = hh_groups(path, tokenizer, 512)
    for ids, n, text in zip(group.answers, group.answer_lens, ["hello there", "no"], strict=True):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[-n:] == expected


def test_learn_rm_trains_from_the_dataset_then_continues_on_new_rankings(
    tiny_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tiny_store.root.parent
    monkeypatch.setenv("RANKLOOP_DATA_DIR", str(data_dir))
    rng = random.Random(3)
    with Dataset(data_dir / "feedback.sqlite3") as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(30)])
    runner = CliRunner()
    monkeypatch.setenv("RANKLOOP_LEARN_RM_READOUT", "last")
    first = runner.invoke(app, ["learn", "rm", "--held-out", "0.2", "--lr", "1e-3", "--epochs", "2"])
    assert first.exit_code == 0, first.output
    rewards = ModelStore(data_dir / "reward_models", prefix="r")
    card = rewards.card("r0001")
    assert card.parent == "v0001" and card.details["last_event_id"] == "1029-0"
    assert card.details["prompts"] + card.details["held_out_prompts"] == 30
    assert card.details["offset_basis"] == "reference answers"
    assert card.details["score_spread"] > 0  # kept with the model too (reward_norm.json), for PPO's advantage floor
    lines = [json.loads(line) for line in Path(card.details["metrics"]).read_text().splitlines()]
    assert "eval_accuracy" in lines[-1] and "accuracy" in lines[0]

    nothing_new = runner.invoke(app, ["learn", "rm", "--from", "r0001"])
    assert nothing_new.exit_code == 1 and "no new ranked prompts" in " ".join(nothing_new.output.split())
    with Dataset(data_dir / "feedback.sqlite3") as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(30, 45)])
    monkeypatch.setenv("RANKLOOP_LEARN_RM_READOUT", "lme")  # a new model's; the chain keeps the one its head learned
    again = runner.invoke(app, ["learn", "rm", "--from", "r0001", "--held-out", "0"])
    assert again.exit_code == 0, again.output
    second = rewards.card("r0002")
    assert (card.details["readout"], second.details["readout"]) == ("last", "last")
    assert readout_of(load_reward_model(rewards.path("r0002"))[0]) == "last"
    assert (second.parent, second.details["prompts"], second.details["last_event_id"]) == ("r0001", 15, "1044-0")
    assert (card.details["held_out"], second.details["held_out"]) == (0.2, 0.0)  # what each was trained with
    with Dataset(data_dir / "feedback.sqlite3") as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(45, 60)])
    third = runner.invoke(app, ["learn", "rm", "--from", "r0002"])  # no --held-out: the chain's share
    assert third.exit_code == 0, third.output
    assert (rewards.card("r0003").details["held_out"], rewards.card("r0003").details["prompts"]) == (0.0, 15)


@pytest.mark.parametrize("readout", ["last", "mean", "lme"])
def test_a_nan_in_the_padding_reaches_neither_the_scores_nor_the_heads_gradient(
    tiny_store: ModelStore, readout: str
) -> None:
    model, _ = load_reward_model(tiny_store.path("v0001"), dtype=torch.float32, readout=readout)
    hidden = torch.randn(2, 3, model.config.hidden_size)
    hidden[0, 0] = float("nan")  # left padding of row 0, as a fully masked position may hold
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    scores = read(model, hidden, mask)
    scores.sum().backward()
    assert torch.isfinite(scores).all() and torch.isfinite(model.score.weight.grad).all()
