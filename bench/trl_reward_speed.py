"""TRL's RewardTrainer on preference pairs, timed: the baseline side of bench/rm_speed.py.

Runs in the separate TRL environment (bench/trl_env.sh), never in rankloop's:

    python bench/trl_reward_speed.py MODEL_DIR PAIRS.jsonl --batch-pairs 12 --steps 6 --threads 2 [--device cuda]

Prints one JSON line: {"pairs_per_s", "steps_timed", "pairs_timed", "seconds"}; the first step is warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl import RewardConfig, RewardTrainer
from trl_common import reward_model


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.durations: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if torch.cuda.is_available() and not args.use_cpu:
            torch.cuda.synchronize()  # the GPU works ahead of Python: time the step to its end
        self.durations.append(time.perf_counter() - self._started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("pairs")
    parser.add_argument("--batch-pairs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    with open(args.pairs, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    model, tokenizer = reward_model(args.model, args.threads, args.device)
    config = RewardConfig(
        output_dir="/tmp/trl-reward-bench",
        per_device_train_batch_size=args.batch_pairs,
        max_steps=args.steps,
        learning_rate=1e-5,
        max_length=args.max_length,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer]
    )
    trainer.train()
    timed = timer.durations[1:]
    pairs = len(timed) * args.batch_pairs
    versions = {"trl": trl.__version__, "transformers": transformers.__version__}
    print(
        json.dumps(
            {
                "pairs_per_s": pairs / sum(timed),
                "steps_timed": len(timed),
                "pairs_timed": pairs,
                "seconds": sum(timed),
                **versions,
            }
        )
    )


if __name__ == "__main__":
    main()
