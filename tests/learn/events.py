"""Feedback-dataset events for the learner's tests: ranking events as the consumer stores them."""

import json
import random

# Token ids of the tiny vocabulary used as answer endings: the preference is "ends with GOOD > MID > BAD".
GOOD, MID, BAD = 300, 200, 100


def ranking_event(i: int, rng: random.Random) -> tuple[str, str, str]:
    """(id, kind, data) of ranking i: question `qi`, two answers, the one ending in GOOD ranked above BAD's."""
    prompt = [rng.randrange(10, 90) for _ in range(4)]
    endings = [GOOD, BAD]
    rng.shuffle(endings)
    candidates = [
        {
            "index": k,
            "text": "",
            "token_ids": [rng.randrange(10, 90), end],
            "logprobs": [-1.0, -1.0],
            "finish_reason": "stop",
        }
        for k, end in enumerate(endings)
    ]
    comparison = {
        "id": f"c{i}",
        "messages": [{"role": "user", "content": f"q{i}"}],
        "prompt_token_ids": prompt,
        "candidates": candidates,
        "policy_version": "v0001",
        "created": 0.0,
        "sampling": {},
    }
    ranking = [[endings.index(GOOD)], [endings.index(BAD)]]
    data = {"kind": "ranking", "ranking": ranking, "user": None, "created": 0.0, "comparison": comparison}
    return f"{1000 + i}-0", "ranking", json.dumps(data)
