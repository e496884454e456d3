"""The learner's losses on a GPU equal the CPU's: the same tiny reward model and policy on both devices give the same
scores, K-wise loss, accuracy, gradients and LM loss. Skipped where no CUDA GPU is present (CI has none).

Imports only what the training code needs (no server, no Redis), so the file also runs on a bare GPU machine with
`pytest --noconftest tests/learn/test_devices.py`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from learn.data import Example
from learn.reward_model import group_loss, load_reward_model
from learn.rm_data import RankedGroup
from learn.sft import collate, lm_loss
from tests.tiny import tiny_llama_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Two prompts of different K, with a tie: prompt a ranks answer 2 first and ties 0 and 1 (2 pairs); b has 1 pair.
GROUPS = [
    RankedGroup("a", [[5, 6, 7, 8], [5, 6, 9], [5, 6, 10, 11, 12]], [[2], [0, 1]]),
    RankedGroup("b", [[20, 21], [20, 22, 23]], [[1], [0]]),
]


def test_kwise_loss_and_gradients_match_on_gpu(tmp_path: Path) -> None:
    folder = tiny_llama_folder(tmp_path / "tiny")
    torch.manual_seed(0)
    cpu_model, tokenizer = load_reward_model(folder, dtype=torch.float32)
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    pad = int(tokenizer.pad_token_id)
    cpu_loss, cpu_accuracy, cpu_scores = group_loss(cpu_model, GROUPS, pad)
    gpu_loss, gpu_accuracy, gpu_scores = group_loss(gpu_model, GROUPS, pad)
    assert gpu_loss.device.type == "cuda" and gpu_scores.shape == (5,)
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=1e-6, rtol=1e-5)
    assert float(gpu_accuracy) == float(cpu_accuracy)
    cpu_loss.backward()
    gpu_loss.backward()
    for (name, p), q in zip(cpu_model.named_parameters(), gpu_model.parameters(), strict=True):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_lm_loss_matches_on_gpu(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_llama_folder(tmp_path / "tiny")
    cpu_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    # Labels -100 over the "prompt" (first two tokens): only the answer is trained on.
    batch = collate([Example([5, 6, 7, 8], [-100, -100, 7, 8]), Example([9, 10, 11], [-100, -100, 11])], pad_id=0)
    torch.testing.assert_close(lm_loss(gpu_model, batch).cpu(), lm_loss(cpu_model, batch), atol=1e-5, rtol=1e-5)
