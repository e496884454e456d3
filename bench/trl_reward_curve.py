"""TRL's RewardTrainer on (chosen, rejected) pairs of ranked SmolLM2 answers, then pairwise accuracy on held-out
pairs: the baseline side of bench/rm_learning_curve.py. Runs in the separate TRL environment (bench/trl_env.sh):

    python bench/trl_reward_curve.py MODEL_DIR TRAIN.jsonl EVAL.json --lr 1e-4 --epochs 3 --batch 24 \
        --train-layers 6

TRAIN.jsonl: conversational `{"prompt", "chosen", "rejected"}` rows. EVAL.json: `{"answers": [[prompt messages,
answer text], ...], "pairs": [[chosen index, rejected index], ...]}`: each answer is scored once.
With --train-layers N only the upper N layers (and the final norm and the head) train, as rankloop's trainer
does; the layers below and the embeddings are frozen. Prints one JSON line: {"accuracy", "pairs", "seconds", ...}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import trl
from datasets import Dataset
from trl import RewardConfig, RewardTrainer
from trl_common import reward_model


def freeze_below(model: Any, train_layers: int) -> None:
    backbone = model.model
    split = max(0, len(backbone.layers) - train_layers) if train_layers else 0
    if not split:
        return
    backbone.embed_tokens.requires_grad_(False)
    for layer in backbone.layers[:split]:
        layer.requires_grad_(False)


@torch.no_grad()
def scores(model: Any, tokenizer: Any, answers: list[list[Any]], batch: int = 16) -> list[float]:
    """Each (prompt messages, answer) scored once, right-padded batches; HF's own pooling (its last non-pad token)."""
    texts = [
        tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
        for prompt, answer in answers
    ]
    out: list[float] = []
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        out += model(**encoded).logits[:, 0].float().tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("train")
    parser.add_argument("eval")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--train-layers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output", default="/tmp/trl-reward-curve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision, as rankloop's side uses on AMX")
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = reward_model(args.model, args.threads, "cpu", args.seed)
    freeze_below(model, args.train_layers)
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line.strip()]
    config = RewardConfig(
        output_dir=args.output,
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        max_length=args.max_length,
        bf16=args.bf16,
        fp16=False,
        report_to="none",
        logging_steps=10,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer).train()
    model.eval()
    held = json.loads(Path(args.eval).read_text())
    scored = scores(model, tokenizer, held["answers"])
    right = sum(scored[w] > scored[lo] for w, lo in held["pairs"])
    print(
        json.dumps(
            {
                "accuracy": right / len(held["pairs"]),
                "pairs": len(held["pairs"]),
                "train_pairs": len(rows),
                "seconds": time.perf_counter() - started,
                "trl": trl.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
