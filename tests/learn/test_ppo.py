"""PPO's boundary between the sequence frame and the answer frame, checked by hand and as a property; and PPO on
the tiny random llama: KL is 0 before any update, a known reward rises (also with every prompt longer than its
answer, and not without the reward), the ptx term adds its gradient, the split forward equals the whole one."""

import copy
import random
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import torch

import learn.ppo
from deploy.model_store import ModelStore
from deploy.settings import load_settings
from learn import layers, rl_math
from learn.data import IGNORE, Example
from learn.ppo import (
    AdapterOff,
    Models,
    PPOConfig,
    PtxBatch,
    Rollouts,
    ValueModel,
    answer_advantages,
    answer_logprobs,
    pack,
    ppo_step,
    ptx_loss,
    sample,
    sequence_reward,
)
from learn.ppo_run import PPO_LORA, PPORound, RoundConfig, iteration_rows
from learn.prompts import Prompt
from learn.reward_model import Norm
from learn.weights import load_causal_lm

PAD = 0


# -- the boundary: sequence frame -> answer frame ---------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_cuts_the_answers_out_whatever_the_prompt_length_and_padding(side: str) -> None:
    # Row 0: prompt [1..5] (longer than its answer [6, 7, 8]); row 1: prompt [1, 2], answer [3, 4, 5, 6].
    packed = pack(Rollouts([[1, 2, 3, 4, 5], [1, 2]], [[6, 7, 8], [3, 4, 5, 6]], [False, True]), PAD, side)
    assert packed.answer_ids.tolist() == [[6, 7, 8, PAD], [3, 4, 5, 6]]
    assert packed.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    if side == "right":  # both rows start at 0: answer token j is predicted from position len(prompt) - 1 + j
        assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 0, 0]]
        assert packed.predictors.tolist() == [[4, 5, 6, 0], [1, 2, 3, 4]]
    else:  # row 1 starts at 8 - 6 = 2
        assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 2, 3, 4, 5, 6]]
        assert packed.predictors.tolist() == [[4, 5, 6, 0], [3, 4, 5, 6]]
    real = packed.attention_mask[1].bool()
    assert packed.position_ids[1][real].tolist() == [0, 1, 2, 3, 4, 5]  # positions count real tokens only

    # Per-position log-probabilities in the sequence frame: the one predicting token y is -y / 10, every other
    # position -99 (it must never be read). Reference 0. Cut out: row 0 -0.6 -0.7 -0.8, row 1 -0.3 -0.4 -0.5 -0.6.
    logprobs = torch.full(packed.input_ids.shape, -99.0, dtype=torch.float64)
    for row in range(2):
        for j, position in enumerate(packed.predictors[row].tolist()[: int(packed.lengths[row])]):
            logprobs[row, position] = -packed.answer_ids[row, j].item() / 10
    answers = packed.answers(logprobs)
    assert torch.allclose(answers, rl_math_t(-0.6, -0.7, -0.8, 0.0, -0.3, -0.4, -0.5, -0.6).view(2, 4))
    # beta 0.1: rewards -0.1 * KL = +0.06, +0.07, +0.08 and +0.03 ... +0.06; scores 2 and 1 on each answer's last
    # token (column 2 of row 0, a prompt position in the sequence frame; column 3 of row 1).
    rewards, _ = rl_math.kl_penalty_rewards(
        answers, torch.zeros_like(answers), packed.mask.double(), rl_math_t(2, 1), beta=0.1
    )
    assert torch.allclose(rewards, rl_math_t(0.06, 0.07, 2.08, 0.0, 0.03, 0.04, 0.05, 1.06).view(2, 4))


@pytest.mark.parametrize("side", ["right", "left"])
def test_answer_positions_mark_the_answer_tokens_in_the_sequence_frame(side: str) -> None:
    # Row 0: prompt of 5, answer of 3; row 1: prompt of 2, answer of 4; row 2: prompt of 1, an empty answer.
    rollouts = Rollouts([[1, 2, 3, 4, 5], [1, 2], [9]], [[6, 7, 8], [3, 4, 5, 6], []], [False, True, True])
    packed = pack(rollouts, PAD, side)
    marked = packed.answer_positions()
    for row in range(3):
        real = packed.input_ids[row][packed.attention_mask[row].bool()].tolist()
        tokens = packed.input_ids[row][marked[row].bool()].tolist()
        assert tokens == rollouts.responses[row] and real[len(real) - len(tokens) :] == tokens
    assert marked.sum(dim=1).tolist() == [3, 4, 0]
    # A sub-batch keeps them: rows 1 and 2 alone, cut to their own width.
    sub = packed.rows([1, 2])
    assert sub.input_ids[sub.answer_positions().bool()].tolist() == [3, 4, 5, 6]
    # One token wide (a one-token prompt, its answer empty): nothing marked, nothing out of range.
    narrow = pack(Rollouts([[9]], [[]], [True]), PAD, side)
    assert narrow.answer_positions().tolist() == [[0]]


def rl_math_t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_an_answers_rewards_advantages_and_returns_do_not_depend_on_its_prompt_or_padding() -> None:
    rng = random.Random(0)

    def per_token(packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence-frame log-probs and values that depend on the answer only: placed at the predicting positions,
        noise everywhere else."""
        logprobs = torch.randn(packed.input_ids.shape, dtype=torch.float64) * 50
        values = torch.randn(packed.input_ids.shape, dtype=torch.float64) * 50
        for row in range(packed.mask.shape[0]):
            answer = packed.answer_ids[row].tolist()[: int(packed.lengths[row])]
            for j, position in enumerate(packed.predictors[row].tolist()[: len(answer)]):
                logprobs[row, position] = -0.01 * answer[j]
                values[row, position] = 0.001 * sum(answer[:j])
        return packed.answers(logprobs), packed.answers(values)

    def figures(rollouts: Rollouts, side: str) -> list[tuple[list[float], list[float], list[float]]]:
        packed = pack(rollouts, PAD, side)  # type: ignore[arg-type]
        logprobs, values = per_token(packed)
        mask = packed.mask.double()
        scores = torch.tensor([float(sum(a)) / 100 for a in rollouts.responses], dtype=torch.float64)
        rewards, _ = rl_math.kl_penalty_rewards(
            logprobs, torch.zeros_like(logprobs), mask, scores, 0.1, torch.tensor(rollouts.truncated), -1.0
        )
        advantages, returns = rl_math.gae(rewards, values, mask, 1.0, 0.95)
        return [
            (rewards[b, :n].tolist(), advantages[b, :n].tolist(), returns[b, :n].tolist())
            for b, n in enumerate(packed.lengths.long().tolist())
        ]

    for _ in range(25):
        answers = [[rng.randrange(1, 99) for _ in range(rng.randrange(1, 9))] for _ in range(4)]
        truncated = [rng.random() < 0.3 for _ in answers]
        prompts = [[rng.randrange(1, 99) for _ in range(rng.randrange(1, 30))] for _ in answers]
        alone = [figures(Rollouts([[7] * 3], [a], [t]), "right")[0] for a, t in zip(answers, truncated, strict=True)]
        for side in ("right", "left"):
            batched = figures(Rollouts(prompts, answers, truncated), side)
            for got, expected in zip(batched, alone, strict=True):
                for a, b in zip(got, expected, strict=True):
                    assert a == pytest.approx(b, abs=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rloo_advantages_by_hand_with_prompts_longer_than_their_answers(side: str) -> None:
    # Prompt P (9 tokens) answered twice, prompt Q (6 tokens) once: every prompt is longer than its answers.
    # Scores 3, 1, 5; beta 0.5; log pi - log pi_ref 0.2 a token; answers of 2, 3 and 1 tokens.
    # Returns: 3 - 0.5 * 0.4 = 2.8; 1 - 0.5 * 0.6 = 0.7; 5 - 0.5 * 0.2 = 4.9.
    # P's: 2.8 - 0.7 = 2.1 and -2.1; Q alone against the batch's rest: 4.9 - (2.8 + 0.7) / 2 = 3.15.
    # Root mean square of 2.1, -2.1, 3.15: sqrt((4.41 + 4.41 + 9.9225) / 3) = sqrt(6.2475) = 2.49950.
    p, q = list(range(10, 19)), list(range(30, 36))
    rollouts = Rollouts([p, q, p], [[5, 6], [8], [7, 8, 9]], [False, False, False])
    packed = pack(rollouts, PAD, side)  # type: ignore[arg-type]
    mask = packed.mask.double()
    rewards, _ = rl_math.kl_penalty_rewards(
        0.2 * mask, torch.zeros_like(mask), mask, rl_math_t(3.0, 5.0, 1.0), 0.5, None
    )
    got, scale = answer_advantages(rollouts, rewards, mask)
    rms = (6.2475) ** 0.5
    assert scale == pytest.approx(rms)
    # Row order P (2 tokens), Q (1), P (3): each answer's advantage on each of its tokens, 0 after it.
    expected = [[2.1, 2.1, 0.0], [3.15, 0.0, 0.0], [-2.1, -2.1, -2.1]]
    assert got.flatten().tolist() == pytest.approx([x / rms for row in expected for x in row])
    # A floor below the root mean square changes nothing; one above it (5) divides instead.
    assert torch.allclose(answer_advantages(rollouts, rewards, mask, floor=2.0)[0], got)
    floored, same_scale = answer_advantages(rollouts, rewards, mask, floor=5.0)
    assert same_scale == pytest.approx(rms)
    assert floored.flatten().tolist() == pytest.approx([x / 5.0 for row in expected for x in row])


def test_each_iteration_takes_every_item_once_per_pass() -> None:
    rows = [iteration_rows(10, 4, i, seed=3) for i in range(5)]  # 20 draws: passes 0 and 1 over 10 items
    flat = [r for batch in rows for r in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert rows == [iteration_rows(10, 4, i, seed=3) for i in range(5)]  # a function of (seed, iteration)


# -- PPO on the tiny llama --------------------------------------------------------------------------------------


@pytest.fixture
def parts(tiny_store: ModelStore) -> tuple[Any, Any, ValueModel, Any]:
    torch.manual_seed(0)
    policy, tokenizer = load_causal_lm(tiny_store.path("v0001"))
    reference = copy.deepcopy(policy).eval()
    value = ValueModel(copy.deepcopy(policy.model), policy.config.hidden_size)
    return policy, reference, value, tokenizer


def low_half_share(vocab: int, prompt_len: int = 4) -> Any:
    """A known reward: the share of answer tokens from the lower half of the vocabulary."""

    def reward(sequences: list[list[int]]) -> torch.Tensor:
        return torch.tensor([sum(t < vocab // 2 for t in s[prompt_len:]) / len(s[prompt_len:]) for s in sequences])

    return reward


def queries(n: int, seed: int = 0, length: int = 4) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (length,), generator=generator).tolist() for _ in range(n)]


def models_of(parts: tuple[Any, Any, ValueModel, Any], reward: Any) -> Models:
    policy, reference, value, tokenizer = parts
    return Models(policy, reference, value, sequence_reward(reward), tokenizer)


def test_kl_is_exactly_zero_before_any_update(parts: tuple[Any, Any, ValueModel, Any]) -> None:
    policy, _, _, tokenizer = parts
    rollouts = sample(policy, queries(4), 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    stats = ppo_step(
        models_of(parts, low_half_share(len(tokenizer))),
        rollouts,
        PPOConfig(epochs=1),
        rl_math.FixedKLController(0.1),
        optimizer,
        tokenizer.pad_token_id,
    )
    assert stats["kl_per_token"] == 0.0 and stats["kl_per_answer"] == 0.0
    assert stats["answer_length"] == pytest.approx(sum(len(r) for r in rollouts.responses) / 4)


def train_on_known_reward(
    parts: tuple[Any, Any, ValueModel, Any],
    prompt_len: int,
    new_tokens: int,
    zeroed: bool,
    advantage: Literal["gae", "rloo"] = "gae",
) -> list[float]:
    """16 PPO iterations on the low-half reward (or on 0: the signal removed); the low-half share of each
    iteration's sampled answers, measured whatever the training reward. With `rloo`, 4 prompts of 4 answers each
    (RLOO's groups) where GAE takes 16 prompts of one."""
    policy, _, value, tokenizer = parts
    share = low_half_share(len(tokenizer), prompt_len)
    trained_on = (lambda s: torch.zeros(len(s))) if zeroed else share
    models = models_of(parts, trained_on)
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(value.head.parameters()), lr=5e-3)
    controller = rl_math.AdaptiveKLController(0.05, target=6.0, horizon=10_000)
    config, history = PPOConfig(epochs=4, minibatch=8, advantage=advantage), []
    for step in range(16):
        prompts = queries(16, step, prompt_len) if advantage == "gae" else queries(4, step, prompt_len) * 4
        rollouts = sample(policy, prompts, new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=step)
        history.append(float(share([q + r for q, r in zip(rollouts.queries, rollouts.responses, strict=True)]).mean()))
        figures = ppo_step(models, rollouts, config, controller, optimizer, tokenizer.pad_token_id)
        assert figures["kl_per_token"] < 4.0
        assert {"policy_loss", "clip_fraction", "entropy", "approx_kl", "beta"} <= set(figures)
        assert ("value_loss" in figures) == (advantage == "gae")  # RLOO fits no value model
    return history


@pytest.mark.parametrize(
    ("prompt_len", "new_tokens", "advantage"),
    [(4, 8, "gae"), (12, 4, "gae"), (12, 4, "rloo")],
    ids=["short-prompts", "long-prompts", "long-prompts-rloo"],
)
def test_a_known_reward_rises_while_kl_stays_bounded(
    parts: tuple[Any, Any, ValueModel, Any], prompt_len: int, new_tokens: int, advantage: Literal["gae", "rloo"]
) -> None:
    # long-prompts: every prompt (12 tokens) is longer than its answer (at most 4): the frame the old code lost.
    history = train_on_known_reward(parts, prompt_len, new_tokens, zeroed=False, advantage=advantage)
    first, last = sum(history[:2]) / 2, sum(history[-3:]) / 3
    assert last > first + 0.1, [round(h, 3) for h in history]  # from about 0.55 (chance) upwards


@pytest.mark.parametrize("advantage", ["gae", "rloo"])
def test_without_the_reward_the_share_does_not_rise(
    parts: tuple[Any, Any, ValueModel, Any], advantage: Literal["gae", "rloo"]
) -> None:
    history = train_on_known_reward(parts, 12, 4, zeroed=True, advantage=advantage)
    first, last = sum(history[:2]) / 2, sum(history[-3:]) / 3
    assert last < first + 0.1, [round(h, 3) for h in history]


def train_on_served_answers(
    parts: tuple[Any, Any, ValueModel, Any], centre: Literal["served", "iteration"], zeroed: bool
) -> list[float]:
    """16 PPO iterations (RLOO) on answers a fixed served version (the reference) wrote, as a round learns from
    users' comparisons, with prompts longer than the answers; the low-half share of answers the policy itself
    samples after each iteration."""
    policy, reference, _, tokenizer = parts
    share = low_half_share(len(tokenizer), 12)
    models = replace(models_of(parts, (lambda s: torch.zeros(len(s))) if zeroed else share), behaviour=reference)
    optimizer = torch.optim.Adam(policy.parameters(), lr=5e-3)
    controller = rl_math.AdaptiveKLController(0.05, target=6.0, horizon=10_000)
    config, history = PPOConfig(epochs=4, minibatch=8, advantage="rloo", clip_centre=centre), []
    for step in range(16):
        served = sample(
            reference, queries(4, step, 12) * 4, 4, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=step
        )
        ppo_step(models, served, config, controller, optimizer, tokenizer.pad_token_id)
        own = sample(policy, queries(16, 100 + step, 12), 4, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=step)
        history.append(float(share([q + r for q, r in zip(own.queries, own.responses, strict=True)]).mean()))
    return history


def test_served_answers_teach_a_known_reward_when_the_clip_follows_the_policy(
    parts: tuple[Any, Any, ValueModel, Any],
) -> None:
    # Centred on the version that wrote the answers, the clip takes away the gradient that would push a sampled
    # token past 1.2 times the writer's probability: the share stalls near what that allows (about 0.65 from 0.6),
    # however many iterations. Centred on each iteration's start it rises on (0.86-0.95 on six draws of the tiny
    # model's weights, against 0.59-0.67).
    fresh = copy.deepcopy(parts)
    capped = train_on_served_answers(parts, "served", zeroed=False)
    followed = train_on_served_answers(fresh, "iteration", zeroed=False)
    first, last = sum(followed[:2]) / 2, sum(followed[-3:]) / 3
    assert last > first + 0.15, [round(h, 3) for h in followed]
    assert sum(capped[-3:]) / 3 < last - 0.1, [round(h, 3) for h in capped]


def test_served_answers_without_the_reward_teach_nothing(parts: tuple[Any, Any, ValueModel, Any]) -> None:
    history = train_on_served_answers(parts, "iteration", zeroed=True)
    first, last = sum(history[:2]) / 2, sum(history[-3:]) / 3
    assert last < first + 0.1, [round(h, 3) for h in history]


def drifted_batch(parts: tuple[Any, Any, ValueModel, Any]) -> tuple[Rollouts, learn.ppo.Packed]:
    """Answers of at most 4 tokens to 8 prompts of 12, from a policy that moved from the reference (the KL term is
    not zero), with the value head at 0 as the control's starts (learn.ppo_run.value_model)."""
    policy, _, value, tokenizer = parts
    with torch.no_grad():
        for weight in policy.parameters():
            weight.add_(torch.randn_like(weight) * 0.02, alpha=1.0)
        for weight in value.head.parameters():
            weight.zero_()
    rollouts = sample(policy, queries(8, seed=2, length=12), 4, tokenizer.eos_token_id, PAD, seed=3)
    return rollouts, pack(rollouts, PAD)


def test_the_advantage_scale_shows_a_reward_that_says_nothing(parts: tuple[Any, Any, ValueModel, Any]) -> None:
    # Whitening divides GAE's advantages by their spread over the batch, `advantage_scale`. With the score replaced
    # by 0 only the KL penalty is left (0.05, the loop's starting beta, times the log-ratio to the reference a
    # token), and whitening still makes unit-sized advantages of it; the scale before whitening tells the two apart.
    tokenizer = parts[3]
    rollouts, packed = drifted_batch(parts)
    scales = {}
    for name, reward in (("scored", low_half_share(len(tokenizer), 12)), ("zero", lambda s: torch.zeros(len(s)))):
        scored = learn.ppo.score(models_of(parts, reward), rollouts, packed, PPOConfig(), beta=0.05)
        spread = rl_math.masked_var(rl_math.gae(*gae_inputs(scored, packed, 0.05), 1.0, 0.95)[0], packed.mask)
        assert scored.advantage_scale == pytest.approx(float(spread.sqrt()), rel=1e-5)
        assert float(rl_math.masked_var(scored.advantages, packed.mask)) == pytest.approx(1.0, rel=1e-4)
        scales[name] = scored.advantage_scale
    assert scales["zero"] < scales["scored"] / 5, scales


def test_a_floor_keeps_the_steps_of_a_reward_that_says_nothing_small(parts: tuple[Any, Any, ValueModel, Any]) -> None:
    # The floor sits between the two scales of the test above: the scored batch is still whitened to unit variance,
    # the zero one is divided by the floor, its advantages' spread then advantage_scale / floor, well below 1.
    tokenizer = parts[3]
    rollouts, packed = drifted_batch(parts)
    config = PPOConfig(advantage_floor=0.2)  # of a spread of 0.5: never divide by less than 0.1
    spreads = {}
    for name, reward in (("scored", low_half_share(len(tokenizer), 12)), ("zero", lambda s: torch.zeros(len(s)))):
        models = replace(models_of(parts, reward), scorer=SimpleNamespace(norm=Norm(0.0, 0.5, "test")))
        scored = learn.ppo.score(models, rollouts, packed, config, beta=0.05)
        assert scored.advantage_floor == pytest.approx(0.1)
        spreads[name] = float(rl_math.masked_var(scored.advantages, packed.mask).sqrt())
        expected = 1.0 if scored.advantage_scale > 0.1 else scored.advantage_scale / 0.1
        assert spreads[name] == pytest.approx(expected, rel=1e-3), name
    assert spreads["scored"] == pytest.approx(1.0, rel=1e-3)
    assert spreads["zero"] < 0.3, spreads


def gae_inputs(
    scored: learn.ppo.Scored, packed: learn.ppo.Packed, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards, values, mask) as `score` gives them to GAE, from what it kept."""
    rewards, _ = rl_math.kl_penalty_rewards(scored.kl, torch.zeros_like(scored.kl), packed.mask, scored.scores, beta)
    return rewards, scored.values, packed.mask


def test_score_gives_rloo_advantages_constant_along_each_answer_and_summing_to_zero_per_prompt(
    parts: tuple[Any, Any, ValueModel, Any],
) -> None:
    policy, _, _, tokenizer = parts
    with torch.no_grad():  # a policy that moved from the reference: the KL term is not zero
        for weight in policy.parameters():
            weight.add_(torch.randn_like(weight) * 0.02, alpha=1.0)
    prompts = queries(2, seed=5, length=12)  # 2 prompts of 12 tokens, 3 answers of at most 4 tokens each
    rollouts = sample(policy, [p for p in prompts for _ in range(3)], 4, tokenizer.eos_token_id, PAD, seed=1)
    models = models_of(parts, low_half_share(len(tokenizer), 12))
    packed = pack(rollouts, PAD)
    scored = learn.ppo.score(models, rollouts, packed, PPOConfig(advantage="rloo"), beta=0.5)
    mask = packed.mask
    assert float(scored.kl.abs().sum()) > 0
    rewards, _ = rl_math.kl_penalty_rewards(scored.kl, torch.zeros_like(scored.kl), mask, scored.scores, 0.5)
    advantages, scale = answer_advantages(rollouts, rewards, mask)
    assert torch.allclose(scored.advantages, advantages) and scored.advantage_scale == pytest.approx(scale)
    first = scored.advantages[:, :1]
    assert torch.allclose(scored.advantages, first * mask)  # one figure on every token of an answer
    assert torch.allclose(first.view(2, 3).sum(dim=1), torch.zeros(2), atol=1e-6)  # leave-one-out sums to 0
    assert torch.equal(scored.returns, scored.values)  # no value model is fitted: its loss is 0


def test_the_ptx_term_adds_its_own_gradient(parts: tuple[Any, Any, ValueModel, Any]) -> None:
    policy, reference, value, tokenizer = parts
    rollouts = sample(policy, queries(4), 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    text = torch.tensor([[5, 17, 42, 99, 7]])
    ptx_batch = (text, torch.ones_like(text), text.clone())
    one_update = PPOConfig(epochs=1, minibatch=4, max_grad_norm=1e9)  # one optimiser step, no clipping of grads

    def grads(coef: float) -> list[torch.Tensor]:
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves .grad and the weights
        models = Models(
            model, reference, copy.deepcopy(value), sequence_reward(low_half_share(len(tokenizer))), tokenizer
        )
        ppo_step(
            models,
            rollouts,
            PPOConfig(**{**one_update.__dict__, "ptx_coef": coef}),
            rl_math.FixedKLController(0.1),
            optimizer,
            tokenizer.pad_token_id,
            [ptx_batch],
        )
        return [p.grad.clone() for p in model.parameters()]

    without, with_ptx = grads(0.0), grads(0.5)
    model = copy.deepcopy(policy)
    # The LM loss of the whole model, written out here: the head on every labelled position.
    logits = model(input_ids=text).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1))
    assert ptx_loss(model, ptx_batch).item() == pytest.approx(expected.item(), abs=1e-6)
    ptx_grads = torch.autograd.grad(ptx_loss(model, ptx_batch), list(model.parameters()))
    for a, b, g in zip(without, with_ptx, ptx_grads, strict=True):
        assert torch.allclose(b - a, 0.5 * g, atol=1e-5)


def test_the_reference_kl_ptx_term_pulls_only_a_policy_that_left_the_reference(
    parts: tuple[Any, Any, ValueModel, Any],
) -> None:
    policy, reference, value, tokenizer = parts
    rollouts = sample(policy, queries(4), 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Two texts, right-padded, the first tokens unlabelled (a prompt): the KL is read at 4 + 1 positions.
    text = torch.tensor([[5, 17, 42, 99, 7], [8, 9, 10, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE, 17, 42, 99, 7], [IGNORE, IGNORE, 10, IGNORE, IGNORE]])
    ptx_batch = (text, attention, labels)
    one_update = PPOConfig(epochs=1, minibatch=4, max_grad_norm=1e9, ptx_loss="reference_kl")

    def grads(model: Any, coef: float) -> list[torch.Tensor]:
        model = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves .grad and the weights
        models = Models(
            model, reference, copy.deepcopy(value), sequence_reward(lambda s: torch.zeros(len(s))), tokenizer
        )
        ppo_step(
            models,
            rollouts,
            replace(one_update, ptx_coef=coef),
            rl_math.FixedKLController(0.1),
            optimizer,
            tokenizer.pad_token_id,
            [ptx_batch],
        )
        return [p.grad.clone() for p in model.parameters()]

    # The policy is the reference: the term adds nothing (the LM loss on the same texts would).
    for a, b in zip(grads(policy, 0.0), grads(policy, 0.5), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    moved = copy.deepcopy(policy)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.05 * torch.randn_like(moved.lm_head.weight))
    # Written out here: KL(ref || pi) of the whole models' next-token distributions at the 5 labelled positions.
    where = labels[:, 1:] != IGNORE
    ref = torch.log_softmax(reference(input_ids=text, attention_mask=attention).logits[:, :-1][where], dim=-1)
    logits = moved(input_ids=text, attention_mask=attention).logits[:, :-1][where]
    expected = (ref.exp() * (ref - torch.log_softmax(logits, dim=-1))).sum(dim=-1).mean()
    assert where.sum() == 5 and expected.item() > 1e-4
    kl_grads = torch.autograd.grad(expected, list(moved.parameters()), allow_unused=True)
    for a, b, g in zip(grads(moved, 0.0), grads(moved, 0.5), kl_grads, strict=True):
        assert torch.allclose(b - a, 0.5 * (torch.zeros_like(a) if g is None else g), atol=1e-5)


def test_the_ptx_loss_left_unset_follows_its_texts() -> None:
    unset = RoundConfig()
    assert unset.ppo.ptx_loss is None
    assert unset.for_ptx(from_reference=True).ppo.ptx_loss == "reference_kl"
    assert unset.for_ptx(from_reference=False).ppo.ptx_loss == "lm"
    chosen = RoundConfig.from_settings(load_settings(learn_ptx_loss="lm"))
    assert chosen.for_ptx(from_reference=True).ppo.ptx_loss == "lm"  # an operator's choice stands


def test_each_optimiser_step_takes_the_next_ptx_batch_in_turn(
    parts: tuple[Any, Any, ValueModel, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy, _, _, tokenizer = parts
    rollouts = sample(policy, queries(4), 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    batches = [(t, torch.ones_like(t), t.clone()) for t in (torch.tensor([[first, 17, 42]]) for first in (5, 6, 7))]
    seen: list[int] = []
    original = learn.ppo.ptx_loss

    def recorded(model: Any, batch: PtxBatch, *args: Any) -> torch.Tensor:
        seen.append(int(batch[0][0, 0]))
        return original(model, batch, *args)

    monkeypatch.setattr(learn.ppo, "ptx_loss", recorded)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    config = PPOConfig(epochs=2, minibatch=2, ptx_coef=0.5)  # 2 epochs of 2 mini-batches: 4 optimiser steps
    figures = ppo_step(
        models_of(parts, low_half_share(len(tokenizer))),
        rollouts,
        config,
        rl_math.FixedKLController(0.1),
        optimizer,
        tokenizer.pad_token_id,
        batches,
    )
    assert seen == [5, 6, 7, 5]
    assert config.steps(len(rollouts.queries)) == len(seen) == 4
    assert figures["ptx_loss"] > 0


def test_sampled_rollouts_give_rloo_its_siblings(parts: tuple[Any, Any, ValueModel, Any]) -> None:
    prompts = [Prompt(f"p{n}", [{"role": "user", "content": "hi"}], [5, 6, n]) for n in range(10, 13)]
    models = models_of(parts, low_half_share(len(parts[3])))

    def drawn(advantage: Literal["gae", "rloo"]) -> list[list[int]]:
        config = RoundConfig(prompts_per_iteration=2, max_new_tokens=3, ppo=PPOConfig(advantage=advantage))
        return PPORound(models, config, prompts).rollouts().queries

    assert [q[-1] for q in drawn("gae")] == [12, 10]  # one answer to each of the iteration's 2 prompts
    assert [q[-1] for q in drawn("rloo")] == [12] * 4 + [10] * 4  # four to each: every answer has 3 siblings
    with pytest.raises(ValueError, match="siblings 1"):
        RoundConfig(siblings=1)


def test_an_iteration_draws_its_ptx_pool_and_deals_it_in_batches(parts: tuple[Any, Any, ValueModel, Any]) -> None:
    # Thirty texts told apart by their first token, each labelled on its own later tokens.
    ptx = [Example([n, n + 1, n + 2], [IGNORE, n + 1, n + 2]) for n in range(10, 40)]
    prompt = Prompt("k", [{"role": "user", "content": "hi"}], [5, 6, 7])
    models = models_of(parts, low_half_share(len(parts[3])))

    def trainer(**fields: Any) -> PPORound:
        return PPORound(models, replace(RoundConfig(ppo=PPOConfig(ptx_coef=0.5)), **fields), [prompt], ptx)

    def firsts(batches: list[PtxBatch]) -> list[list[int]]:
        for ids, _, labels in batches:  # each example's labels are its own tokens
            assert torch.equal(labels[:, 1:], ids[:, 1:]) and (labels[:, 0] == IGNORE).all()
        return [b[0][:, 0].tolist() for b in batches]

    pooled = firsts(trainer().ptx_batches(16))  # the defaults: one example a step, four an iteration
    assert [len(b) for b in pooled] == [1, 1, 1, 1] and len({b[0] for b in pooled}) == 4
    assert firsts(trainer().ptx_batches(16)) == pooled  # a function of the seed and the iteration
    later = trainer()
    later.iteration = 1
    assert firsts(later.ptx_batches(16)) != pooled
    same_four = firsts(trainer(ptx_batch=4).ptx_batches(16))  # four a step, the same four at every step
    assert [len(b) for b in same_four] == [4] and len(set(same_four[0])) == 4
    own = firsts(trainer(ptx_pool=None).ptx_batches(16))  # a batch of its own each step, no text twice
    assert [len(b) for b in own] == [1] * 16 and len({b[0] for b in own}) == 16
    assert len(trainer(ptx_pool=None).ptx_batches(40)) == 40  # more steps than texts: texts repeat
    assert [len(b) for b in firsts(trainer(ptx_batch=2, ptx_pool=5).ptx_batches(16))] == [2, 2]  # whole batches
    assert len(trainer().ptx_batches(2)) == 2  # never more drawn than the steps take
    assert trainer().ptx_batches(0) == []
    assert trainer(ppo=PPOConfig(ptx_coef=0.0)).ptx_batches(16) == []
    with pytest.raises(ValueError, match="ptx_pool 2"):
        RoundConfig(ptx_batch=4, ptx_pool=2)


def test_answer_logprobs_equal_the_full_forwards_at_the_answer_positions(tiny_store: ModelStore) -> None:
    rollouts = Rollouts([[5, 6, 7], [8]], [[9, 10, 2], [11, 12]], [False, True])
    plain, _ = load_causal_lm(tiny_store.path("v0001"))
    lora, _ = load_causal_lm(tiny_store.path("v0001"), PPO_LORA)
    with torch.no_grad():
        for p in lora.parameters():  # adapters that do something, so that switching them off shows
            if p.requires_grad:
                p.add_(0.05)
    # By hand, per row: the full forward of the sequence alone, the log-probability of each answer token.
    expected: dict[str, list[list[float]]] = {"plain": [], "lora": []}
    with torch.no_grad():
        for query, answer in zip(rollouts.queries, rollouts.responses, strict=True):
            ids = torch.tensor([query + answer])
            for name, model in (("plain", plain), ("lora", lora)):
                lp = rl_math.token_logprobs(model(input_ids=ids).logits[0, :-1], ids[0, 1:])
                expected[name].append(lp[len(query) - 1 :].tolist())
        for side in ("right", "left"):
            packed = pack(rollouts, PAD, side)  # type: ignore[arg-type]
            for model, name in ((plain, "plain"), (AdapterOff(lora), "plain"), (lora, "lora")):
                got = answer_logprobs(model, packed)
                for row, values in enumerate(expected[name]):
                    assert got[row, : len(values)].tolist() == pytest.approx(values, abs=1e-5), (side, name)
                assert got[packed.mask == 0].abs().sum() == 0  # nothing outside the answers
    assert expected["lora"][0] != pytest.approx(expected["plain"][0], abs=1e-3)


def test_the_split_forward_equals_the_whole_one_and_trains_only_above(tiny_store: ModelStore) -> None:
    lora, _ = load_causal_lm(tiny_store.path("v0001"), PPO_LORA, train_layers=1)  # the tiny llama has 2 layers
    backbone = layers.backbone_of(lora)
    split = layers.split_point(backbone, 1)
    assert split == 1
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n for n in trained)  # adapters on the upper layer only
    packed = pack(Rollouts([[5, 6, 7, 8, 9, 10], [8]], [[9, 10, 2], [11, 12]], [False, True]), PAD)
    assert layers.split_matches(backbone, split, packed.input_ids, packed.attention_mask, packed.position_ids)
    from learn.ppo import lower_of

    below = lower_of(lora, split, packed)
    whole = answer_logprobs(lora, packed)
    assert torch.allclose(answer_logprobs(lora, packed, split, below), whole, atol=1e-6)
    plain, _ = load_causal_lm(tiny_store.path("v0001"))
    assert layers.same_lower(backbone, layers.backbone_of(plain), split)
    with torch.no_grad():
        layers.backbone_of(plain).layers[0].mlp.down_proj.weight.add_(0.01)
    assert not layers.same_lower(backbone, layers.backbone_of(plain), split)


def test_scoring_in_groups_of_similar_length_equals_one_pass(
    parts: tuple[Any, Any, ValueModel, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import learn.ppo

    policy, _, _, tokenizer = parts
    rollouts = sample(
        policy, queries(12, length=5) + queries(5, seed=1, length=17), 7, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    models = models_of(parts, low_half_share(len(tokenizer), 5))
    packed = pack(rollouts, tokenizer.pad_token_id)
    sub = packed.rows([12, 3])
    assert sub.width == max(len(rollouts.queries[r]) + len(rollouts.responses[r]) for r in (12, 3))
    assert sub.mask.shape[1] == max(len(rollouts.responses[r]) for r in (12, 3))
    grouped = learn.ppo.score(models, rollouts, packed, PPOConfig(), 0.1)
    monkeypatch.setattr(learn.ppo, "SCORE_ROWS", 1000)
    whole = learn.ppo.score(models, rollouts, packed, PPOConfig(), 0.1)
    for name in ("old_logprobs", "proximal_logprobs", "values", "scores", "kl", "advantages", "returns", "features"):
        assert torch.allclose(getattr(grouped, name), getattr(whole, name), atol=1e-5), name
    real = packed.attention_mask.bool()  # past a row's end the groups hold zeros, one pass the pad tokens' states
    assert torch.allclose(grouped.below[real], whole.below[real], atol=1e-5)


@pytest.mark.parametrize("centre", ["served", "iteration"])
def test_the_update_centres_and_weights_its_clip_as_configured(
    parts: tuple[Any, Any, ValueModel, Any], centre: Literal["served", "iteration"]
) -> None:
    # The policy has moved away from the version that wrote the answers (the reference here), so the writer's,
    # the proximal and the current log-probabilities all differ; prompts (9 tokens) longer than the answers (6).
    from collections import defaultdict

    policy, reference, _, tokenizer = parts
    rollouts = sample(reference, queries(4, length=9) * 2, 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        for weight in policy.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    models = replace(models_of(parts, low_half_share(len(tokenizer), 9)), behaviour=reference)
    packed = pack(rollouts, tokenizer.pad_token_id)
    config = PPOConfig(advantage="rloo", clip_centre=centre)
    scored = learn.ppo.score(models, rollouts, packed, config, 0.1)
    # The proximal log-probabilities as an iteration's earlier steps would leave them: the update's own loss then
    # tells which centre and weights it used.
    proximal = scored.proximal_logprobs + 0.3 * packed.mask
    scored = replace(scored, proximal_logprobs=proximal)
    rows = list(range(len(rollouts.queries)))
    figures: dict[str, list[torch.Tensor]] = defaultdict(list)
    learn.ppo._policy_and_value_loss(models, packed, scored, config, rows, False, figures)
    new = answer_logprobs(policy, packed).detach()
    old, advantages, mask = scored.old_logprobs, scored.advantages, packed.mask
    weighted = rl_math.clipped_policy_loss(
        new, proximal, advantages, mask, 0.2, rl_math.proximal_weights(proximal, old, mask)
    ).loss
    served = rl_math.clipped_policy_loss(new, old, advantages, mask, 0.2).loss
    expected, other = (weighted, served) if centre == "iteration" else (served, weighted)
    assert figures["policy_loss"][0].item() == pytest.approx(expected.item(), abs=1e-6)
    unweighted = rl_math.clipped_policy_loss(new, proximal, advantages, mask, 0.2).loss
    assert abs(expected.item() - other.item()) > 1e-3 and abs(weighted.item() - unweighted.item()) > 1e-3


def test_the_reference_kl_of_a_lora_round_reads_the_reference_with_adapters_off_above_a_shared_split(
    tiny_store: ModelStore,
) -> None:
    import learn.ppo

    # A round's default models: LoRA on the upper layer, the reference its adapters switched off, lower layers shared.
    lora, tokenizer = load_causal_lm(tiny_store.path("v0001"), PPO_LORA, train_layers=1)
    plain, _ = load_causal_lm(tiny_store.path("v0001"))
    with torch.no_grad():
        for p in lora.parameters():  # adapters that do something, so that the reference differs from the policy
            if p.requires_grad:
                p.add_(0.05)
    split = layers.split_point(layers.backbone_of(lora), 1)
    value = ValueModel(copy.deepcopy(plain.model), plain.config.hidden_size)
    models = Models(
        lora, AdapterOff(lora), value, sequence_reward(lambda s: torch.zeros(len(s))), tokenizer, split=split
    )
    models = replace(models, lower_shared=frozenset({"reference"}))
    text = torch.tensor([[5, 17, 42, 99, 7], [8, 9, 10, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 42, 99, 7], [IGNORE, 9, 10, IGNORE, IGNORE]])
    share = learn.ppo._ptx_share(models, (text, attention, labels), frozen=True, distil=True)
    # Written out on whole forwards: the plain model is the reference, the LoRA model the policy.
    where = labels[:, 1:] != IGNORE
    with torch.no_grad():
        ref = torch.log_softmax(plain(input_ids=text, attention_mask=attention).logits[:, :-1][where], dim=-1)
        pi = torch.log_softmax(lora(input_ids=text, attention_mask=attention).logits[:, :-1][where], dim=-1)
        assert share.reference is not None and torch.allclose(share.reference, ref, atol=1e-5)
        expected = (ref.exp() * (ref - pi)).sum(dim=-1).mean()
        assert expected.item() > 1e-4
        got = learn.ppo._ptx_term(lora, share, split)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
