"""SFT and continued pre-training on the tiny random llama: label masks, falling loss, exact resume, the store."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from deploy.model_store import Card, ModelStore
from feedback.history import rows_of
from learn.data import (
    IGNORE,
    DataError,
    Demonstration,
    by_length,
    demonstrations_from_rows,
    encode_demonstration,
    encode_text,
)
from learn.loop import LoopConfig
from learn.policy_eval import lm_loss_of
from learn.sft import train_lm
from learn.trainlog import MetricsLog
from learn.weights import LoraOptions, as_stored, load_causal_lm, pad_id, save_policy
from rankloop.cli import app
from tests.tiny import tiny_tokenizer

DEMOS = [
    Demonstration([{"role": "user", "content": f"what is {a} {b}"}], f"{a} {b} is {a}{b}") for a in "0123" for b in "56"
]


def test_the_prompt_is_masked_and_the_answer_is_the_label() -> None:
    tokenizer = tiny_tokenizer()
    demo = Demonstration([{"role": "user", "content": "hello world"}], "paris")
    example = encode_demonstration(tokenizer, demo, max_len=512)
    prompt = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("paris<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + answer_ids
    assert example.labels == [IGNORE] * len(prompt_ids) + answer_ids
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]) == "paris<|im_end|>\n"


def test_plain_text_trains_on_every_token_in_pieces() -> None:
    tokenizer = tiny_tokenizer()
    examples = encode_text(tokenizer, "the quick brown fox jumps over the lazy dog", max_len=4)
    ids = tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    assert [t for e in examples for t in e.input_ids] == [*ids, tokenizer.eos_token_id]
    assert all(e.labels == e.input_ids and len(e.input_ids) <= 4 for e in examples)


def test_demonstrations_are_read_from_every_supported_shape() -> None:
    rows: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "a"}], "answer": "b"},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"instruction": "e", "input": "f", "output": "g"},
        {"instruction": "h", "instances": [{"input": "", "output": "i"}, {"input": "j", "output": "k"}]},
    ]
    got = [(d.messages[-1]["content"], d.answer) for d in demonstrations_from_rows(rows, "x")]
    assert got == [("a", "b"), ("c", "d"), ("e\n\nf", "g"), ("h", "i"), ("h\n\nj", "k")]
    with pytest.raises(DataError, match="x, row 1: expected messages"):
        list(demonstrations_from_rows([{"prompt": "p"}], "x"))


def _examples(tokenizer: Any) -> list[Any]:
    return [encode_demonstration(tokenizer, d, 64) for d in DEMOS]


def test_sft_lowers_the_loss(tiny_store: ModelStore, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(tiny_store.path("v0001"))
    examples = _examples(tokenizer)
    before = lm_loss_of(model, examples, pad_id(tokenizer))
    with MetricsLog(tmp_path / "m.jsonl") as log:
        result = train_lm(
            model, tokenizer, examples, LoopConfig(epochs=15, batch_size=4, lr=3e-3), log, "sft", show_progress=False
        )
    after = lm_loss_of(model, examples, pad_id(tokenizer))
    assert result.steps == 30
    assert after < 0.5 * before, (before, after)
    lines = rows_of(tmp_path / "m.jsonl")
    assert [line["step"] for line in lines] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "tokens", "time"} <= set(lines[0])


def test_resume_continues_exactly_from_the_checkpoint(tiny_store: ModelStore, tmp_path: Path) -> None:
    config = LoopConfig(epochs=2, batch_size=2, lr=1e-3)  # 8 steps over 8 examples
    straight, tokenizer = load_causal_lm(tiny_store.path("v0001"))
    examples = _examples(tokenizer)
    whole = train_lm(straight, tokenizer, examples, config, MetricsLog(None), "a", show_progress=False)

    resumed, _ = load_causal_lm(tiny_store.path("v0001"))
    ckpt = tmp_path / "ckpt.pt"
    first = train_lm(
        resumed,
        tokenizer,
        examples,
        LoopConfig(**{**config.__dict__, "max_steps": 3}),
        MetricsLog(None),
        "b",
        ckpt,
        show_progress=False,
    )
    fresh, _ = load_causal_lm(tiny_store.path("v0001"))  # a new process: weights from the checkpoint only
    rest = train_lm(fresh, tokenizer, examples, config, MetricsLog(None), "c", ckpt, show_progress=False)
    assert (first.steps, rest.resumed_from, rest.steps) == (3, 3, 8)
    assert first.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    for (name, a), (_, b) in zip(straight.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_lora_trains_adapters_and_saves_a_merged_version(tiny_store: ModelStore) -> None:
    model, tokenizer = load_causal_lm(tiny_store.path("v0001"), LoraOptions(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    result = train_lm(
        model,
        tokenizer,
        _examples(tokenizer),
        LoopConfig(batch_size=4, lr=1e-2),
        MetricsLog(None),
        "lora",
        show_progress=False,
    )
    save_policy(model, tokenizer, tiny_store, Card(version="v0002", parent="v0001", made_by="sft"))
    merged, _ = load_causal_lm(tiny_store.path("v0002"))
    assert not any("lora" in n for n in merged.state_dict())
    assert result.steps == 2 and tiny_store.versions() == ["v0001", "v0002"]


def test_the_stored_copy_is_what_the_store_holds_and_the_round_keeps_its_adapters(tiny_store: ModelStore) -> None:
    model, tokenizer = load_causal_lm(tiny_store.path("v0001"), LoraOptions(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a change below bf16's resolution on some weights, above it on others
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.linspace(-1e-3, 3e-2, weight.numel()).reshape(weight.shape))
    ids = torch.tensor([[3, 7, 11, 5, 9]])
    stored = as_stored(model)
    with torch.no_grad():
        judged, trained = stored(ids).logits, model(ids).logits
    save_policy(stored, tokenizer, tiny_store, Card(version="v0002", parent="v0001", made_by="ppo"))
    loaded, _ = load_causal_lm(tiny_store.path("v0002"))
    with torch.no_grad():
        served = loaded(ids).logits
    # The gate measures the version users get (to float rounding of the same weights in another module layout);
    # the round's fp32 adapters differ from it by far more.
    gap, rounding = (trained - served).abs().max().item(), (judged - served).abs().max().item()
    assert rounding < 1e-5 and gap > 100 * rounding, (gap, rounding)
    assert any("lora_" in n for n, _ in model.named_parameters())  # the round's own model is left as it was


def test_learn_sft_command_writes_a_version_with_its_card(
    tiny_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": d.messages, "answer": d.answer}) + "\n" for d in DEMOS))
    monkeypatch.setenv("RANKLOOP_DATA_DIR", str(tiny_store.root.parent))
    done = CliRunner().invoke(app, ["learn", "sft", "--data", str(data), "--epochs", "1", "--batch-size", "4"])
    assert done.exit_code == 0, done.output
    card = tiny_store.card("v0002")
    assert (card.parent, card.made_by, card.details["examples"], card.details["steps"]) == ("v0001", "sft", 8, 2)
    assert len(card.details["loss_curve"]) == 2
    assert tiny_store.current() == "v0001"  # a new version is not served until an operator promotes it
    missing = CliRunner().invoke(app, ["learn", "sft", "--data", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1 and "nope.jsonl: no such file" in " ".join(missing.output.split())


def test_by_length_groups_indices_shortest_first_ties_in_order() -> None:
    assert by_length([5, 1, 3, 1], 2) == [[1, 3], [2, 0]]
    assert by_length([2, 9, 4], 2) == [[0, 2], [1]] and by_length([], 3) == []
