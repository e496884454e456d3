"""An evaluation's KL to the reference, with the layers both compute run once, is the plain two-pass figure."""

import copy

import torch

from learn.policy_eval import answer_kl
from learn.ppo import Rollouts, answer_logprobs, pack
from learn.rounds import VersionToSample
from tests.tiny import small_llama


def test_kl_with_shared_lower_layers_equals_two_whole_passes() -> None:
    reference = small_llama(layers=4)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a round trained the upper two layers only
        policy.model.layers[3].mlp.down_proj.weight.add_(0.2)
        policy.model.layers[2].self_attn.o_proj.weight.mul_(1.5)
    # Prompts longer and shorter than their answers, and one answer of a single token.
    rollouts = Rollouts([[5, 9, 12, 7, 3], [4, 4], [11, 2, 6]], [[8, 21], [30, 31, 32, 33], [7]], [False] * 3)
    with torch.no_grad():
        packed = pack(rollouts, 0)
        plain = ((answer_logprobs(policy, packed) - answer_logprobs(reference, packed)) * packed.mask).sum(dim=1)
        shared = answer_kl(VersionToSample(policy, reference, None, split=2), rollouts, 0)
    assert plain.abs().min() > 1e-3  # the two differ on every answer
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)
    assert answer_kl(VersionToSample(policy, policy, None), rollouts, 0).tolist() == [0.0, 0.0, 0.0]
