"""Tiny stand-ins built in memory: a byte-level BPE tokenizer with a ChatML template, and a 2-layer llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from deploy.model_store import ModelStore

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "answer you said hello world what is the capital of france paris",
    "write a short poem about the sea and the sky",
    "0 1 2 3 4 5 6 7 8 9 : ? ! . ,",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 4,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_folder(folder: Path, with_chat_template: bool = True, seed: int = 0) -> Path:
    """Save a random 2-layer llama (hidden 64), its weights drawn from `seed` (the same model in every run: a
    learning test must not pass or fail by the draw), and the tiny tokenizer as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    if not with_chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_versions_store(root: Path) -> ModelStore:
    """A store with v0001 (current), v0002 (a copy, as a trained version would be) and v0003 (another shape)."""
    import shutil

    from transformers import AutoConfig, LlamaForCausalLM

    from deploy.model_import import import_model
    from deploy.model_store import Card

    def copy(source: Path, target: Path) -> None:
        for file in source.iterdir():
            if file.name != "card.json":
                shutil.copy(file, target / file.name)

    store = ModelStore(root / "models")
    import_model(store, tiny_llama_folder(root / "tiny"))
    store.publish(Card("v0002", "v0001", "sft"), lambda f: copy(store.path("v0001"), f))
    other = tiny_llama_folder(root / "other")
    config = (other / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32')
    (other / "config.json").write_text(config)
    LlamaForCausalLM(AutoConfig.from_pretrained(other)).save_pretrained(other)
    store.publish(Card("v0003", "v0001", "sft"), lambda f: copy(other, f))
    return store


def tiny_teachable_folder(folder: Path, prompts: list[str], seed: int = 0) -> Path:
    """The tiny llama after a short SFT on answers of 1 to 12 words from its corpus, so that it ends its answers
    after varied lengths: a policy that a length preference (`concise`) has something to choose from."""
    import random

    import torch

    from learn.data import Demonstration, encode_demonstration
    from learn.loop import LoopConfig
    from learn.sft import train_lm
    from learn.trainlog import MetricsLog
    from learn.weights import load_causal_lm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    words = " ".join(CORPUS).split()
    source = tiny_llama_folder(folder.with_name(folder.name + "-random"))
    model, tokenizer = load_causal_lm(source)
    demos = [
        Demonstration(
            [{"role": "user", "content": rng.choice(prompts)}],
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))),
        )
        for _ in range(256)
    ]
    examples = [encode_demonstration(tokenizer, d, 128) for d in demos]
    with MetricsLog(None) as log:
        train_lm(
            model,
            tokenizer,
            examples,
            LoopConfig(epochs=3, batch_size=16, lr=3e-3),
            log,
            "tiny sft",
            show_progress=False,
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def publish_adapter_version(store: ModelStore, version: str, base: str = "v0001", rank: int = 16) -> None:
    """`version` as a round keeps an adapter version: `base`'s weights copied, a card naming it a rank-`rank` adapter
    on `base`, and that adapter (zero: it answers as `base` does) in its folder."""
    import shutil

    import torch

    from deploy.model_store import ADAPTER_FOLDER, Card
    from learn.adapters import Adapter, save_adapter

    def fill(folder: Path) -> None:
        for file in store.path(base).iterdir():
            shutil.copy(file, folder / file.name)
        zero = Adapter({"model.layers.1.mlp.down_proj": (torch.zeros(rank, 128), torch.zeros(64, rank))})
        save_adapter(zero, folder / ADAPTER_FOLDER, base)

    store.publish(Card(version, base, "ppo", details={"adapter": {"base": base, "rank": rank}}), fill)


def small_llama(layers: int = 4, seed: int = 0) -> Any:
    """A random llama built in memory (hidden 32, a 64-token vocabulary, pad id 0), the same for a seed, in eval
    mode: for tests of the layers' arithmetic, where the tokenizer does not matter."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]
