"""Shared by the scripts that run in TRL's environment: thread budget, seed, and the reward model to train."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def reward_model(folder: str, threads: int, device: str = "cpu", seed: int = 0) -> tuple[Any, Any]:
    """SmolLM2 with a fresh scalar head in fp32, as rankloop's trainer starts it; pad token set. On a GPU the fp32
    products run as TF32, as rankloop's side does (bench/common.py, Device)."""
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
