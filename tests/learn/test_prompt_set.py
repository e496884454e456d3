"""rankloop's own prompt set: what simulated users ask and versions are judged on in a clone that has nothing else."""

import json

from feedback.simulate import split
from learn.prompts import DEFAULT_PROMPTS, conversations
from rankloop.loop_cli import _prompts


def test_the_shipped_prompts_are_varied_and_have_a_held_out_split() -> None:
    rows = [json.loads(line) for line in DEFAULT_PROMPTS.read_text().splitlines()]
    prompts = [row["prompt"] for row in rows]
    assert len(prompts) == len(set(prompts)) >= 300
    assert len({row["category"] for row in rows}) >= 10
    assert all(1 <= len(p.split()) <= 60 for p in prompts)
    train, held = split(list(conversations(DEFAULT_PROMPTS)))
    # The learner's own split (10% by hash): enough held-out prompts for 100 judged pairs at 4 samples each.
    assert len(held) >= 25 and len(train) + len(held) == len(prompts)


def test_simulate_and_eval_default_to_them() -> None:
    assert _prompts(None) == list(conversations(DEFAULT_PROMPTS))
