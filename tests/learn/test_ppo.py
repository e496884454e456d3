"""PPO on the tiny random llama: KL is 0 before any update, a known reward rises, the ptx term adds its gradient."""

import copy
from typing import Any

import pytest
import torch

from deploy.model_store import ModelStore
from learn import rl_math
from learn.ppo import PPOConfig, Rollouts, ValueHead, pack, ppo_step, ptx_loss, sample
from learn.sft import load_causal_lm


@pytest.fixture
def models(tiny_store: ModelStore) -> tuple[Any, Any, ValueHead, Any]:
    torch.manual_seed(0)
    policy, tokenizer = load_causal_lm(tiny_store.path("v0001"))
    reference = copy.deepcopy(policy).eval()
    value = ValueHead(copy.deepcopy(policy.model), policy.config.hidden_size)
    return policy, reference, value, tokenizer


def low_half_share(vocab: int) -> Any:
    """A known reward: the share of answer tokens from the lower half of the vocabulary."""

    def reward(sequences: list[list[int]]) -> torch.Tensor:
        return torch.tensor([sum(t < vocab // 2 for t in s[4:]) / len(s[4:]) for s in sequences])  # queries: 4 tokens

    return reward


def queries(n: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (4,), generator=generator).tolist() for _ in range(n)]


def test_pack_marks_the_positions_that_predict_the_answer() -> None:
    packed = pack(Rollouts([[5, 6], [7]], [[8, 9, 2], [10]], [False, True]), pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 8, 9, 2], [7, 10, 0, 0, 0]]
    # Row 0: tokens 8, 9, 2 are predicted from positions 1, 2, 3; row 1: token 10 from position 0.
    assert packed.response_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]


def test_kl_is_exactly_zero_before_any_update(models: tuple[Any, Any, ValueHead, Any]) -> None:
    policy, reference, value, tokenizer = models
    rollouts = sample(policy, queries(4), 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    stats = ppo_step(policy, reference, value, low_half_share(len(tokenizer)), rollouts, PPOConfig(epochs=1),
                     rl_math.FixedKLController(0.1), optimizer, tokenizer.pad_token_id)  # fmt: skip
    assert stats["kl_per_token"] == 0.0 and stats["kl_per_answer"] == 0.0
    assert stats["answer_length"] == pytest.approx(sum(len(r) for r in rollouts.responses) / 4)


def test_a_known_reward_rises_while_kl_stays_bounded(models: tuple[Any, Any, ValueHead, Any]) -> None:
    policy, reference, value, tokenizer = models
    reward = low_half_share(len(tokenizer))
    params = list(policy.parameters()) + list(value.head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    controller = rl_math.AdaptiveKLController(0.05, target=6.0, horizon=10_000)
    config = PPOConfig(epochs=4, minibatch=8)
    history = []
    for step in range(16):
        rollouts = sample(policy, queries(16, seed=step), 8, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=step)
        history.append(ppo_step(policy, reference, value, reward, rollouts, config, controller, optimizer,
                                tokenizer.pad_token_id))  # fmt: skip
    first = sum(h["reward"] for h in history[:2]) / 2
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.1, [round(h["reward"], 3) for h in history]  # from about 0.55 (chance) upwards
    assert all(h["kl_per_token"] < 4.0 for h in history)
    assert {"policy_loss", "value_loss", "clip_fraction", "entropy", "approx_kl", "beta"} <= set(history[-1])


def test_the_ptx_term_adds_its_own_gradient(models: tuple[Any, Any, ValueHead, Any]) -> None:
    policy, reference, value, tokenizer = models
    rollouts = sample(policy, queries(4), 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    text = torch.tensor([[5, 17, 42, 99, 7]])
    ptx_batch = (text, torch.ones_like(text), text.clone())
    one_update = PPOConfig(epochs=1, minibatch=4, max_grad_norm=1e9)  # one optimiser step, no clipping of grads

    def grads(coef: float) -> list[torch.Tensor]:
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves .grad and the weights
        ppo_step(model, reference, copy.deepcopy(value), low_half_share(len(tokenizer)), rollouts,
                 PPOConfig(**{**one_update.__dict__, "ptx_coef": coef}), rl_math.FixedKLController(0.1), optimizer,
                 tokenizer.pad_token_id, ptx_batch)  # fmt: skip
        return [p.grad.clone() for p in model.parameters()]

    without, with_ptx = grads(0.0), grads(0.5)
    model = copy.deepcopy(policy)
    (ptx_grads := torch.autograd.grad(ptx_loss(model, ptx_batch), list(model.parameters())))
    for a, b, g in zip(without, with_ptx, ptx_grads, strict=True):
        assert torch.allclose(b - a, 0.5 * g, atol=1e-5)


def test_answer_logprobs_equal_the_full_forwards_at_the_answer_positions(tiny_store: ModelStore) -> None:
    from learn.ppo import AdapterOff, token_logprobs
    from learn.ppo_run import PPO_LORA

    rollouts = Rollouts([[5, 6, 7], [8]], [[9, 10, 2], [11, 12]], [False, True])
    packed = pack(rollouts, pad_id=0)
    mask = packed.response_mask.bool()
    plain, _ = load_causal_lm(tiny_store.path("v0001"))
    lora, _ = load_causal_lm(tiny_store.path("v0001"), PPO_LORA)
    with torch.no_grad():
        for p in lora.parameters():  # adapters that do something, so that switching them off shows
            if p.requires_grad:
                p.add_(0.05)
        full = rl_math.token_logprobs(plain(input_ids=packed.input_ids).logits[:, :-1], packed.input_ids[:, 1:])
        adapted = rl_math.token_logprobs(lora(input_ids=packed.input_ids).logits[:, :-1], packed.input_ids[:, 1:])
        for model, expected in ((plain, full), (AdapterOff(lora), full), (lora, adapted)):
            got = token_logprobs(model, packed)
            assert torch.allclose(got[mask], expected[mask], atol=1e-5)
            assert got[~mask].abs().sum() == 0  # nothing outside the answers
    assert not torch.allclose(adapted[mask], full[mask], atol=1e-3)
