"""TRL's RewardTrainer trained on HH-RLHF pairs, then pairwise accuracy on held-out pairs: the baseline side of
bench/rm_accuracy.py. Runs in the separate TRL environment (bench/trl_env.sh):

    python bench/trl_reward_accuracy.py MODEL_DIR TRAIN.jsonl EVAL.jsonl --lr 2e-5 --batch 8 --max-length 1024 \
        [--device cuda] [--gradient-checkpointing] [--save-steps 5]

Rows are conversational `{"prompt", "chosen", "rejected"}`.
Prints one JSON line: {"accuracy", "pairs", "trl", "transformers"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from trl import RewardConfig, RewardTrainer
from trl_common import reward_model


def read(path: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@torch.no_grad()
def score(model: object, tokenizer: object, messages: list[dict[str, str]]) -> float:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt", return_dict=True)  # type: ignore[attr-defined]
    return float(model(**ids.to(model.device)).logits[0, 0])  # type: ignore[attr-defined,operator]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("train")
    parser.add_argument("eval")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--output", default="/tmp/trl-reward-accuracy", help="Checkpoints; a rerun resumes from them.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="The new head's initial weights and the pairs' order.")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--save-steps", type=int, default=0, help="Steps between checkpoints; 0: none.")
    args = parser.parse_args()
    model, tokenizer = reward_model(args.model, args.threads, args.device, args.seed)
    # save_steps must be positive even where nothing is saved (save_strategy 'no').
    config = RewardConfig(
        output_dir=args.output,
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=args.lr,
        max_length=args.max_length,
        bf16=False,
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to="none",
        logging_steps=10,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=1,
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        seed=args.seed,
    )
    resume = any(Path(args.output).glob("checkpoint-*"))
    RewardTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(read(args.train)), processing_class=tokenizer
    ).train(resume_from_checkpoint=resume or None)
    model.eval()
    rows = read(args.eval)
    right = sum(
        score(model, tokenizer, row["prompt"] + row["chosen"])
        > score(model, tokenizer, row["prompt"] + row["rejected"])  # type: ignore[operator]
        for row in rows
    )
    print(
        json.dumps(
            {
                "accuracy": right / len(rows),
                "pairs": len(rows),
                "trl": trl.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
