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


def _round_folders(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny llama as policy and reference, and a reward model on its backbone (random head, offset 0.25)."""
    from learn.reward_model import Norm, write_norm

    folder = tiny_llama_folder(tmp_path / "tiny")
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(folder)
    reward = tmp_path / "reward"
    model.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    write_norm(reward, Norm(0.25, 0.0, "test"))
    return folder, reward


# Served comparisons whose prompts are longer than their answers (the frames differ), K=3 and K=2.
SERVED = [
    ([5, 6, 7, 8, 9, 10, 11], [[12, 13], [14], [15, 16, 17]], [False, False, True]),
    ([20, 21, 22, 23, 24, 25], [[26, 27, 28], [29]], [False, False]),
]
PTX = [Example([5, 6, 7, 8], [-100, -100, 7, 8]), Example([9, 10, 11], [-100, -100, 11])]


def _one_iteration(folder: Path, reward: Path, device: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    from learn.ppo import PPOConfig
    from learn.ppo_run import PPORound, RoundConfig, load_models
    from learn.prompts import Served

    config = RoundConfig(
        iterations=1, prompts_per_iteration=2, train_layers=1, ppo=PPOConfig(ptx_coef=0.5, epochs=2, minibatch=2)
    )
    served = [Served(f"c{n}", f"k{n}", p, a, t, "v0001") for n, (p, a, t) in enumerate(SERVED)]
    torch.manual_seed(0)  # the adapters' initialisation, on the CPU before they move: the same on both devices
    models = load_models(folder, folder, reward, config, writer_folder=folder, device=device)
    trainer = PPORound(models, config, [], PTX, served)
    figures = trainer.step()
    trained = {n: p.detach().cpu() for n, p in models.policy.named_parameters() if p.requires_grad}
    trained.update({f"value.{n}": p.detach().cpu() for n, p in models.value.head.named_parameters()})
    return figures, trained


def test_a_ppo_iteration_matches_on_gpu(tmp_path: Path) -> None:
    """Scoring, GAE, the clipped updates and the ptx term on the GPU: the figures and the trained adapters and value
    head after one iteration are the CPU's (fp32 on both)."""
    folder, reward = _round_folders(tmp_path)
    cpu_figures, cpu_weights = _one_iteration(folder, reward, "cpu")
    gpu_figures, gpu_weights = _one_iteration(folder, reward, "cuda")
    for name in ("reward", "kl_per_answer", "policy_loss", "value_loss", "ptx_loss", "entropy", "answer_length"):
        assert gpu_figures[name] == pytest.approx(cpu_figures[name], rel=1e-3, abs=1e-4), name
    assert cpu_weights.keys() == gpu_weights.keys() and len(cpu_weights) > 2
    for name, weight in cpu_weights.items():
        torch.testing.assert_close(gpu_weights[name], weight, atol=1e-4, rtol=1e-3, msg=name)


def test_a_whole_round_runs_on_the_gpu(tmp_path: Path) -> None:
    """The daemon's two rounds with RANKLOOP_LEARN_DEVICE=cuda and bf16 products: the reward model trains and is
    judged there, PPO trains, evaluates and publishes there, and the card says where the version was made."""
    import random

    from deploy.model_import import import_model
    from deploy.model_store import ModelStore
    from deploy.settings import load_settings
    from feedback.dataset import Dataset
    from learn.daemon import compute, rm_options
    from learn.ppo_run import RoundConfig
    from learn.rounds import PPOOptions, ppo_round, rm_round
    from tests.learn.events import ranking_event

    data = tmp_path / "data"
    import_model(ModelStore(data / "models"), tiny_llama_folder(tmp_path / "src"))
    settings = load_settings(data_dir=data, learn_device="cuda", learn_train_layers=1, learn_rm_train_layers=1)
    rng = random.Random(0)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(40)])
    device, bf16 = compute(settings)
    assert device == "cuda:0" and bf16
    rm = rm_round(settings, rm_options(settings, None), show_progress=False)
    assert rm.card.details["device"] == "cuda:0" and rm.evaluation.pairs > 0
    config = RoundConfig.from_settings(settings).changed(iterations=2, prompts_per_iteration=4, max_new_tokens=8)
    result = ppo_round(settings, config, PPOOptions(bf16=bf16, device=device), show_progress=False)
    assert result.card.details["device"] == "cuda:0"
    assert result.after.answers > 0 and result.after.kl == result.after.kl  # measured, and not NaN
    assert (data / "models" / result.version / "model.safetensors").is_file()
