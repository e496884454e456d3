"""Versions as LoRA adapters: two rounds' adapters compose into one whose delta is their sum (worked by hand), and
the folder written is one PEFT reads back onto the base to give the merged model's logits exactly."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from learn.adapters import Adapter, compose, from_peft, load_adapter, save_adapter
from tests.tiny import tiny_llama_folder


def test_composed_adapters_add_their_deltas() -> None:
    # first: rank 1 on q, delta 2·[[1, 0], [0, 0]]; then: rank 1 on q and on v.
    first = Adapter({"q": (torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]]))})
    then = Adapter(
        {
            "q": (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [0.5]])),
            "v": (torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0], [0.0]])),
        }
    )
    both = compose(first, then)
    assert both.rank == 2
    assert torch.equal(both.delta("q"), torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    assert torch.equal(both.delta("v"), torch.tensor([[3.0, 3.0], [0.0, 0.0]]))  # zeros where `first` had none
    assert torch.equal(both.modules["v"][0][0], torch.zeros(2))


def lora_round(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A LoRA model on `model` whose adapters are random, as if a round had trained them (scaling alpha/r = 2)."""
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, parameter in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return peft


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_chain_of_two_rounds_is_one_adapter_on_the_base(tmp_path: Path) -> None:
    folder = tiny_llama_folder(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    first = lora_round(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), seed=1)
    adapter = from_peft(first)
    parent = first.merge_and_unload()  # what the store keeps as the first version
    second = lora_round(parent, seed=2)
    adapter = compose(adapter, from_peft(second))
    merged = second.merge_and_unload()
    save_adapter(adapter, tmp_path / "adapter", base=str(folder), dtype=torch.float32)
    assert load_adapter(tmp_path / "adapter").rank == 8
    assert not torch.allclose(logits(base, ids), logits(merged, ids), atol=1e-3)  # the rounds changed something
    served = PeftModel.from_pretrained(base, tmp_path / "adapter")  # (injects the adapter into `base`)
    assert torch.allclose(logits(served, ids), logits(merged, ids), atol=1e-5)


def test_an_adapter_round_trips_through_its_folder(tmp_path: Path) -> None:
    adapter = Adapter({"model.layers.0.mlp.down_proj": (torch.randn(4, 8), torch.randn(6, 4))})
    save_adapter(adapter, tmp_path, base="v0001", dtype=torch.float32)
    loaded = load_adapter(tmp_path)
    assert torch.equal(loaded.delta("model.layers.0.mlp.down_proj"), adapter.delta("model.layers.0.mlp.down_proj"))
    with pytest.raises(KeyError):
        loaded.delta("model.layers.1.mlp.down_proj")


def test_rounds_keep_their_versions_as_adapters_on_the_first_base(tmp_path: Path) -> None:
    """Two LoRA rounds: v0002 is an adapter on v0001, v0003 one on v0001 too (both rounds' deltas), whose PEFT
    folder on v0001 gives v0003's stored weights' logits; with a rank limit of one round's, v0003 is a base."""
    import random

    from deploy.model_store import ModelStore
    from deploy.settings import load_settings
    from feedback.dataset import Dataset
    from learn.ppo_run import RoundConfig
    from learn.rounds import PPOOptions, ppo_round
    from tests.learn.events import ranking_event
    from tests.learn.test_ppo_round import make_data_dir

    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_threads=1)
    rng = random.Random(0)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([ranking_event(i, rng) for i in range(12)])
    config = RoundConfig(iterations=1, prompts_per_iteration=4, max_new_tokens=4, lr=0.05, value_lr=0.05)
    for parent in ("v0001", "v0002"):
        ppo_round(settings, config, PPOOptions(parent=parent), show_progress=False)
    store = ModelStore(data / "models")
    assert store.card("v0002").details["adapter"] == {"base": "v0001", "rank": 16}
    assert store.card("v0003").details["adapter"] == {"base": "v0001", "rank": 32}
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    stored = AutoModelForCausalLM.from_pretrained(store.path("v0003"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(store.path("v0001"), dtype=torch.float32)
    moved = float((logits(base, ids) - logits(stored, ids)).abs().max())
    assert moved > 0.5  # the rounds moved it (by 0.99-1.18 on two CPUs)
    served = PeftModel.from_pretrained(base, store.path("v0003") / "adapter")
    # v0003's stored weights went through bf16 twice (v0002's, then its own), the adapter on the fp32 base not at
    # all: they were 0.004 apart on one CPU, 0.035 on another. A tenth of the move still tells the adapter of both
    # rounds from none (a whole move apart) and from one round's alone.
    assert float((logits(served, ids) - logits(stored, ids)).abs().max()) < 0.1 * moved
    narrow = load_settings(data_dir=data, learn_threads=1, max_adapter_rank=16)
    ppo_round(narrow, config, PPOOptions(parent="v0002"), show_progress=False)
    assert "adapter" not in store.card("v0004").details and not (store.path("v0004") / "adapter").exists()
