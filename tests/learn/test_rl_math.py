"""The RLHF math on numbers worked out by hand (in the comments), plus properties on random data."""

import math

import pytest
import torch

from learn.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_penalty_rewards,
    kwise_ranking_loss,
    leave_one_out,
    masked_mean,
    masked_var,
    pack_rankings,
    pairwise_accuracy,
    proximal_weights,
    ranking_pairs,
    reference_kl,
    sequence_scores,
    token_logprobs,
    token_logprobs_and_entropy,
    whiten,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def i(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# -- K-wise ranking loss ----------------------------------------------------------------------------------------


def test_k3_loss_from_literal_scores() -> None:
    # Scores 2, 1, 0 ranked in that order: pairs (0,1) diff 1, (0,2) diff 2, (1,2) diff 1.
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(2) = log(1 + e^-2) = 0.1269280.
    # Loss = (0.3132617 * 2 + 0.1269280) / 3 = 0.2511505.
    loss = kwise_ranking_loss(t(2.0, 1.0, 0.0), i(0, 0, 0), i(0, 1, 2))
    assert loss.item() == pytest.approx(0.2511505, abs=1e-7)


def test_ties_form_no_pair() -> None:
    # Answer 0 beats 1 and 2, which tie: pairs (0,1) diff 1 and (0,2) diff 0.5, no (1,2).
    # (log(1 + e^-1) + log(1 + e^-0.5)) / 2 = (0.3132617 + 0.4740770) / 2 = 0.3936693.
    winners, losers, _ = ranking_pairs(i(0, 0, 0), i(0, 1, 1))
    assert list(zip(winners.tolist(), losers.tolist(), strict=True)) == [(0, 1), (0, 2)]
    assert kwise_ranking_loss(t(1.0, 0.0, 0.5), i(0, 0, 0), i(0, 1, 1)).item() == pytest.approx(0.3936693, abs=1e-7)


def test_prompts_with_different_k_weigh_the_same() -> None:
    # Prompt 0 (K=2): equal scores, loss log 2 = 0.6931472 over its 1 pair. Prompt 1 (K=3): 0.2511505 as above.
    # The mean over prompts, not over the 4 pairs: (0.6931472 + 0.2511505) / 2 = 0.4721489.
    scores, groups, ranks = t(0.0, 0.0, 2.0, 1.0, 0.0), i(0, 0, 1, 1, 1), i(0, 1, 0, 1, 2)
    assert kwise_ranking_loss(scores, groups, ranks).item() == pytest.approx(0.4721489, abs=1e-7)


def test_margin_and_unranked_answers() -> None:
    # Answer 2 unranked (-1): only the pair (0,1), diff 1, margin 1: -log sigmoid(0) = log 2.
    loss = kwise_ranking_loss(t(1.0, 0.0, 5.0), i(0, 0, 0), i(0, 1, -1), margin=1.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-9)


def test_kwise_equals_the_mean_of_explicit_pairwise_losses_and_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    groups, ranks = i(0, 0, 0, 0, 1, 1, 1, 2, 2), i(0, 1, 2, 3, 1, 0, 1, 2, 0)
    scores = torch.randn(9, generator=generator, dtype=torch.float64, requires_grad=True)
    kwise = kwise_ranking_loss(scores, groups, ranks)
    (grad_kwise,) = torch.autograd.grad(kwise, scores)

    explicit = []
    for g in range(3):
        members = [n for n in range(9) if groups[n] == g]
        pair_losses = [
            -torch.nn.functional.logsigmoid(scores[a] - scores[b])
            for a in members
            for b in members
            if ranks[a] < ranks[b]
        ]
        explicit.append(torch.stack(pair_losses).mean())
    pairwise = torch.stack(explicit).mean()
    (grad_pairwise,) = torch.autograd.grad(pairwise, scores)
    assert kwise.item() == pytest.approx(pairwise.item(), abs=1e-12)
    assert torch.allclose(grad_kwise, grad_pairwise, atol=1e-12)


def test_pack_rankings_offsets_prompts_of_different_k() -> None:
    # Prompt 0: K=2, 1 beats 0. Prompt 1: K=3, 2 beats 0, 1 unranked.
    groups, ranks = pack_rankings([(2, [[1], [0]]), (3, [[2], [0]])])
    assert groups.tolist() == [0, 0, 1, 1, 1]
    assert ranks.tolist() == [1, 0, 1, -1, 0]


def test_pairwise_accuracy() -> None:
    # Ranks 0, 2, 1: pairs (0,1): 2 > 1 right; (0,2): 2 > 0 right; (2,1): 0 > 1 wrong. 2 of 3.
    assert pairwise_accuracy(t(2.0, 1.0, 0.0), i(0, 0, 0), i(0, 2, 1)).item() == pytest.approx(2 / 3)


# -- statistics -------------------------------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_padding() -> None:
    values, mask = t(1.0, 3.0, 100.0), t(1.0, 1.0, 0.0)
    assert masked_mean(values, mask).item() == 2.0
    assert masked_var(values, mask).item() == pytest.approx(2.0)  # ((1-2)^2 + (3-2)^2) / (2 - 1)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(1.0)
    assert masked_var(t(4.0, 100.0), t(1.0, 0.0)).item() == 0.0  # one token: 0, not 0/0 = NaN in the weights


def test_whiten() -> None:
    # Mean 2.5; unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; std 1.2909944.
    # (1 - 2.5) / 1.2909944 = -1.1618950; (2 - 2.5) / 1.2909944 = -0.3872983.
    out = whiten(t(1.0, 2.0, 3.0, 4.0), t(1.0, 1.0, 1.0, 1.0))
    assert out.tolist() == pytest.approx([-1.1618950, -0.3872983, 0.3872983, 1.1618950], abs=1e-6)


def test_whiten_divides_by_no_less_than_its_floor() -> None:
    # Answers (rows) right- and left-padded: the real values are 1, 3 and 5, mean 3, unbiased variance (4 + 0 + 4) / 2
    # = 4, std 2. A floor of 1 is below it: (-1, 0, 1). A floor of 4 is above: (-0.5, 0, 0.5), a step half as large.
    values, mask = t([1.0, 3.0, 99.0], [-7.0, 5.0, 0.0]), t([1.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    assert whiten(values, mask, min_std=1.0).flatten().tolist() == pytest.approx([-1, 0, 0, 0, 1, 0], abs=1e-6)
    assert whiten(values, mask, min_std=4.0).flatten().tolist() == pytest.approx([-0.5, 0, 0, 0, 0.5, 0], abs=1e-6)


# -- rewards and advantages -------------------------------------------------------------------------------------


def test_sequence_scores_read_the_last_real_token_or_the_mean_with_padding_on_either_side() -> None:
    # Row 0: prompt 2 tokens + answer 1, right-padded by 1: per-token 1, 2, 3 -> last 3, mean (1+2+3)/3 = 2.
    # Row 1: left-padded by 2, two real tokens 4, 6 -> last 6, mean 5. Row 2: prompt 3 + answer 1, no padding:
    # last 8, mean (2+2+2+8)/4 = 3.5. The padding holds NaN, as a fully masked position may: it must not leak.
    nan = float("nan")
    per_token = t(1, 2, 3, nan, nan, nan, 4, 6, 2, 2, 2, 8).view(3, 4)
    mask = i(1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1).view(3, 4)
    assert sequence_scores(per_token, mask, "last").tolist() == [3.0, 6.0, 8.0]
    assert sequence_scores(per_token, mask, "mean").tolist() == [2.0, 5.0, 3.5]
    with pytest.raises(ValueError, match="unknown reward-model readout 'max'"):
        sequence_scores(per_token, mask, "max")


def test_lme_pools_the_answer_tokens_by_log_mean_exp_with_padding_on_either_side() -> None:
    # Row 0: prompt 1 token + answer 2, right-padded: log((e^2 + e^3) / 2) = 2 + log((1 + e) / 2) = 2.6201145.
    # Row 1: left-padded by 2, prompt 4 then answer 6: log(e^6 / 1) = 6. Row 2: prompt of 4, its answer cut to
    # nothing: its last real token alone, 8. Without answer masks every real token is pooled: row 0 gives
    # log((e + e^2 + e^3) / 3) = 2.3089937, row 1 log((e^4 + e^6) / 2) = 5.4337808, row 2
    # log((3 e^2 + e^8) / 4) = 6.6211144.
    nan = float("nan")
    per_token = t(1, 2, 3, nan, nan, nan, 4, 6, 2, 2, 2, 8).view(3, 4).requires_grad_()
    mask = i(1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1).view(3, 4)
    answer = i(0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0).view(3, 4)
    scores = sequence_scores(per_token, mask, "lme", answer)
    assert scores.tolist() == pytest.approx([2.6201145, 6.0, 8.0], abs=1e-6)
    pooled_all = sequence_scores(per_token, mask, "lme").tolist()
    assert pooled_all == pytest.approx([2.3089937, 5.4337808, 6.6211144], abs=1e-6)
    # Gradients: a softmax over each row's pooled tokens, nothing (and no NaN) elsewhere, the empty answer's last token.
    scores.sum().backward()
    assert per_token.grad is not None
    share = 1 / (1 + math.e)  # e^2 / (e^2 + e^3)
    expected = [0, share, 1 - share, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert per_token.grad.view(-1).tolist() == pytest.approx(expected, abs=1e-6)


def test_lme_of_an_answer_does_not_depend_on_its_prompt() -> None:
    # The same answer scores (0.5, -1, 3) after prompts of 1 and 5 tokens with anything in them, right and left padded.
    short = t(9.0, 0.5, -1.0, 3.0, 0.0, 0.0, 0.0, 0.0)
    long = t(-7.0, 100.0, 2.0, 2.0, 1.0, 0.5, -1.0, 3.0)
    left = t(0.0, 0.0, 0.0, 0.0, 9.0, 0.5, -1.0, 3.0)
    per_token = torch.stack([short, long, left])
    mask = torch.stack([i(1, 1, 1, 1, 0, 0, 0, 0), i(1, 1, 1, 1, 1, 1, 1, 1), i(0, 0, 0, 0, 1, 1, 1, 1)])
    answer = torch.stack([i(0, 1, 1, 1, 0, 0, 0, 0), i(0, 0, 0, 0, 0, 1, 1, 1), i(0, 0, 0, 0, 0, 1, 1, 1)])
    scores = sequence_scores(per_token, mask, "lme", answer)
    by_hand = math.log((math.exp(0.5) + math.exp(-1.0) + math.exp(3.0)) / 3)
    assert scores.tolist() == pytest.approx([by_hand] * 3, abs=1e-6)


def test_a_mask_in_the_sequence_frame_is_refused() -> None:
    # Prompt [1, 2, 3, 4, 5], answer [6, 7, 8] packed as one sequence: the positions predicting the answer are 4-6
    # of 7, so the mask in the sequence's frame is 0 0 0 0 1 1 1. Read as answer-aligned, "the last token" would be
    # sum - 1 = 2, a prompt position, and the score would be erased by the mask: refused instead.
    sequence_frame = t(0, 0, 0, 0, 1, 1, 1).unsqueeze(0)
    zeros = torch.zeros(1, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="not in the answer frame"):
        kl_penalty_rewards(zeros, zeros, sequence_frame, t(2.0), beta=0.1)
    with pytest.raises(ValueError, match="not in the answer frame"):
        gae(zeros, zeros, sequence_frame, 1.0, 1.0)
    left_padded = t(0, 1, 1).unsqueeze(0)  # an answer padded on its left: also not the answer frame
    with pytest.raises(ValueError, match="row 0"):
        kl_penalty_rewards(torch.zeros(1, 3), torch.zeros(1, 3), left_padded, t(1.0), beta=0.1)
    with pytest.raises(ValueError, match="row 1"):  # a row with no token: its score has nowhere to go
        kl_penalty_rewards(torch.zeros(2, 2), torch.zeros(2, 2), t(1, 1, 0, 0).view(2, 2), t(1.0, 1.0), beta=0.1)


def test_kl_penalty_rewards_put_the_score_on_the_last_real_token() -> None:
    # KL per token: -1 - (-1.5) = 0.5, 0, -3 - (-2) = -1; beta 0.1: rewards -0.05, 0, +0.1; score 2 on the last.
    logprobs, ref = t(-1.0, -2.0, -3.0).unsqueeze(0), t(-1.5, -2.0, -2.0).unsqueeze(0)
    rewards, kl = kl_penalty_rewards(logprobs, ref, torch.ones(1, 3, dtype=torch.float64), t(2.0), beta=0.1)
    assert kl.tolist() == [[0.5, 0.0, -1.0]]
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 2.1])


def test_truncated_answers_and_padding() -> None:
    # Row 0: cut by the length limit, penalty -1: last reward 0 + 2 - 1 = 1. Row 1: two real tokens, score 2 at t=1.
    logprobs = torch.zeros(2, 3, dtype=torch.float64)
    mask = t(1, 1, 1, 1, 1, 0).view(2, 3)
    rewards, _ = kl_penalty_rewards(
        logprobs, logprobs, mask, t(2.0, 2.0), beta=0.1, truncated=torch.tensor([True, False]), truncation_penalty=-1.0
    )
    assert rewards.tolist() == [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]


def test_gae_with_gamma_and_lambda_one_on_a_three_step_reward() -> None:
    # Rewards 0, 0, 1; values 0.5, 0.6, 0.7; V after the end 0.
    # deltas: t2 = 1 + 0 - 0.7 = 0.3; t1 = 0 + 0.7 - 0.6 = 0.1; t0 = 0 + 0.6 - 0.5 = 0.1.
    # A2 = 0.3; A1 = 0.1 + 0.3 = 0.4; A0 = 0.1 + 0.4 = 0.5. Returns = A + V = 1, 1, 1 (the reward still to come).
    advantages, returns = gae(t(0, 0, 1).unsqueeze(0), t(0.5, 0.6, 0.7).unsqueeze(0), torch.ones(1, 3), 1.0, 1.0)
    assert advantages.tolist()[0] == pytest.approx([0.5, 0.4, 0.3])
    assert returns.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])


def test_gae_discounted() -> None:
    # gamma 0.9, lambda 0.5 (gamma * lambda = 0.45), same rewards and values.
    # deltas: t2 = 1 - 0.7 = 0.3; t1 = 0.9 * 0.7 - 0.6 = 0.03; t0 = 0.9 * 0.6 - 0.5 = 0.04.
    # A2 = 0.3; A1 = 0.03 + 0.45 * 0.3 = 0.165; A0 = 0.04 + 0.45 * 0.165 = 0.11425.
    advantages, _ = gae(t(0, 0, 1).unsqueeze(0), t(0.5, 0.6, 0.7).unsqueeze(0), torch.ones(1, 3), 0.9, 0.5)
    assert advantages.tolist()[0] == pytest.approx([0.11425, 0.165, 0.3])


def test_gae_stops_at_the_end_of_each_answer() -> None:
    # Mask 1, 1, 0: the padded step's reward 5 and value 9 must not leak in.
    # t1: 1 + 0 - 0.5 = 0.5; t0: 0 + 0.5 - 0.5 + 0.5 = 0.5; t2: 0.
    advantages, _ = gae(t(0, 1, 5).unsqueeze(0), t(0.5, 0.5, 9).unsqueeze(0), t(1, 1, 0).unsqueeze(0), 1.0, 1.0)
    assert advantages.tolist()[0] == pytest.approx([0.5, 0.5, 0.0])


def test_leave_one_out_sets_each_answer_against_its_siblings_mean() -> None:
    # Prompt 0: returns 1, 2, 6 -> baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5 -> -3, -1.5, 4.5.
    # Prompt 1 (rows interleaved with prompt 0's): returns 4, 0 -> baselines 0, 4 -> 4, -4.
    got = leave_one_out(t(1, 4, 2, 6, 0), i(0, 1, 0, 0, 1))
    assert got.tolist() == pytest.approx([-3.0, 4.0, -1.5, 4.5, -4.0])
    # What a prompt adds to all its answers cancels: prompt 1's returns + 100 give the same advantages.
    assert leave_one_out(t(1, 104, 2, 6, 100), i(0, 1, 0, 0, 1)).tolist() == pytest.approx(got.tolist())


def test_an_answer_without_siblings_is_set_against_the_rest_of_the_batch() -> None:
    # Rows 0, 1 share prompt 0: -1, 1. Row 2 alone: 6 - mean(1, 2) = 4.5. A batch of one: 0.
    assert leave_one_out(t(1, 2, 6), i(0, 0, 1)).tolist() == pytest.approx([-1.0, 1.0, 4.5])
    assert leave_one_out(t(3.0), i(0)).tolist() == [0.0]


# -- losses -----------------------------------------------------------------------------------------------------


def test_clipped_policy_loss() -> None:
    # clip 0.2. Token 0: ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2 (clipped).
    # Token 1: ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5 (unclipped). Token 2: ratio 0.5, A = -1: max(0.5, 0.8) = 0.8
    # (clipped). Loss (-1.2 - 0.5 + 0.8) / 3 = -0.3; clip fraction 2/3.
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = t(math.log(1.5), math.log(0.5), math.log(0.5)).unsqueeze(0)
    out = clipped_policy_loss(new, old, t(1.0, 1.0, -1.0).unsqueeze(0), torch.ones(1, 3), clip=0.2)
    assert out.loss.item() == pytest.approx(-0.3)
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    # approx KL: 0.5 * mean(log(1.5)^2, log(0.5)^2, log(0.5)^2) = 0.5 * (0.1644 + 0.4805 + 0.4805) / 3 = 0.1875.
    assert out.approx_kl.item() == pytest.approx(0.1875, abs=1e-4)


def test_proximal_weights_are_cut_at_the_cap_and_zero_on_padding() -> None:
    # pi_prox / pi_behav: e^(log 1.5) = 1.5; e^(log 3) = 3 -> cap 2; e^(log 0.25) = 0.25; padding -> 0.
    behaviour = torch.zeros(1, 4, dtype=torch.float64)
    proximal = t(math.log(1.5), math.log(3.0), math.log(0.25), 5.0).unsqueeze(0)
    weights = proximal_weights(proximal, behaviour, t(1, 1, 1, 0).unsqueeze(0))
    assert weights.tolist()[0] == pytest.approx([1.5, 2.0, 0.25, 0.0])


def test_decoupled_clip_is_centred_on_the_proximal_policy() -> None:
    # The served version wrote two tokens, A = +1 each; the policy has since come to 1.5x and 0.5x their
    # probabilities (proximal), and the update is now at 1.6x and 0.5x. Centred on the writer (plain PPO), the
    # first is past the clip: max(-1.6, -1.2) = -1.2, no gradient; the second max(-0.5, -0.8) = -0.5.
    # Loss (-1.2 - 0.5) / 2 = -0.85, d loss / d logprob_0 = 0.
    # Decoupled: ratios to the proximal 1.6/1.5 = 1.0667 and 1; weights 1.5 and 0.5.
    # Token 0: 1.5 * max(-1.0667, -1.0667) = -1.6; token 1: 0.5 * -1 = -0.5. Loss (-1.6 - 0.5) / 2 = -1.05, and
    # d loss / d logprob_0 = -1.5 * 1.0667 / 2 = -0.8: the first token still gets pushed up.
    behaviour = torch.zeros(1, 2, dtype=torch.float64)
    proximal = t(math.log(1.5), math.log(0.5)).unsqueeze(0)
    advantages, mask = t(1.0, 1.0).unsqueeze(0), torch.ones(1, 2, dtype=torch.float64)
    plain_new = t(math.log(1.6), math.log(0.5)).unsqueeze(0).requires_grad_()
    plain = clipped_policy_loss(plain_new, behaviour, advantages, mask, clip=0.2)
    plain.loss.backward()  # type: ignore[no-untyped-call]
    assert plain.loss.item() == pytest.approx(-0.85)
    assert plain_new.grad is not None and plain_new.grad[0, 0].item() == 0.0
    new = t(math.log(1.6), math.log(0.5)).unsqueeze(0).requires_grad_()
    weights = proximal_weights(proximal, behaviour, mask)
    decoupled = clipped_policy_loss(new, proximal, advantages, mask, clip=0.2, weights=weights)
    decoupled.loss.backward()  # type: ignore[no-untyped-call]
    assert decoupled.loss.item() == pytest.approx(-1.05)
    assert new.grad is not None and new.grad[0, 0].item() == pytest.approx(-0.8)
    assert decoupled.clip_fraction.item() == 0.0
    # Where the policy has not moved since the served version (the first iteration), the two are one loss.
    same = clipped_policy_loss(
        new.detach(), behaviour, advantages, mask, 0.2, proximal_weights(behaviour, behaviour, mask)
    )
    assert same.loss.item() == pytest.approx(
        clipped_policy_loss(new.detach(), behaviour, advantages, mask, 0.2).loss.item()
    )


def test_clipped_value_loss() -> None:
    # V = 1, V_old = 0, R = 2, clip 0.2: clipped V = 0.2. Errors (1-2)^2 = 1, (0.2-2)^2 = 3.24; 0.5 * 3.24 = 1.62.
    loss, fraction = clipped_value_loss(t(1.0).view(1, 1), t(0.0).view(1, 1), t(2.0).view(1, 1), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(1.62)
    assert fraction.item() == 1.0


def test_entropy_and_token_logprobs_of_a_uniform_distribution() -> None:
    logits = torch.zeros(1, 2, 4)  # uniform over 4 tokens: entropy log 4 = 1.3862944, log p = -log 4
    picked, entropy = token_logprobs_and_entropy(logits[0], i(3, 0))
    assert entropy.tolist() == pytest.approx([1.3862944] * 2, abs=1e-6)
    assert picked.tolist() == pytest.approx([-1.3862944] * 2, abs=1e-6)
    assert token_logprobs(logits, i(3, 0).view(1, 2)).tolist()[0] == pytest.approx([-1.3862944] * 2, abs=1e-6)


def test_logprobs_and_entropy_of_a_skewed_distribution_from_one_softmax() -> None:
    # p = (1/4, 3/4): entropy 1/4 ln 4 + 3/4 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351; ln 3/4 = -0.2876821
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    picked, entropy = token_logprobs_and_entropy(logits, i(1))
    assert picked.item() == pytest.approx(-0.2876821, abs=1e-6)
    assert entropy.item() == pytest.approx(0.5623351, abs=1e-6)
    assert picked.requires_grad and not entropy.requires_grad  # a figure to read, not a term of the loss


# -- KL controllers ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_beta_with_clipped_error() -> None:
    # target 6, horizon 10000, 256 steps. KL 9: error 9/6 - 1 = 0.5, clipped to 0.2:
    # beta 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512. KL 3: error -0.5 -> -0.2: 0.100512 * 0.99488.
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert controller.update(9.0, 256) == pytest.approx(0.100512)
    assert controller.update(3.0, 256) == pytest.approx(0.100512 * 0.99488)
    # KL 6.6: error 0.1, inside the clip: * (1 + 0.1 * 256 / 10000).
    before = controller.value
    assert controller.update(6.6, 256) == pytest.approx(before * 1.00256)


def test_fixed_kl_controller_stays() -> None:
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 256) == 0.05


def test_reference_kl_by_hand_and_its_gradient_is_zero_at_the_reference() -> None:
    reference = torch.log(t(0.5, 0.5, 0.9, 0.1).view(2, 2))
    policy = torch.log(t(0.75, 0.25, 0.9, 0.1).view(2, 2))
    # Row 1: 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 (-0.405465) + 0.5 (0.693147) = 0.143841; row 2: 0. Mean 0.071921.
    assert reference_kl(policy, reference).item() == pytest.approx(0.0719205, abs=1e-6)
    # Where the policy is the reference, no gradient: the LM loss of one sampled token (token 0 here) has one.
    at_reference = reference.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(reference_kl(at_reference, reference), at_reference)
    assert gradient.abs().max().item() < 1e-7
    (sampled,) = torch.autograd.grad(-token_logprobs(at_reference, i(0, 0)).mean(), at_reference)
    assert sampled.abs().max().item() > 0.01
    # The identity reference_kl rests on: averaged over the reference's next tokens, that gradient is 0 too.
    expected = sum(
        p * torch.autograd.grad(-token_logprobs(at_reference, i(a, b)).mean(), at_reference)[0]
        for a, b, p in ((0, 0, 0.45), (0, 1, 0.05), (1, 0, 0.45), (1, 1, 0.05))
    )
    assert torch.allclose(expected, torch.zeros_like(at_reference), atol=1e-7)
