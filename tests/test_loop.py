"""The whole loop at small scale: simulated users rank answers by `concise` through the real HTTP API of a server
process (the tiny llama on the transformers engine) and a real Redis server; the learner daemon turns their
rankings into versions and promotes them; the served model's answers get shorter and beat v0001."""

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from deploy.model_import import import_model
from deploy.model_store import ModelStore
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry
from deploy.settings import load_settings
from feedback.consumer import FeedbackConsumer
from feedback.dataset import Dataset
from lab.judge import compare
from lab.preferences import concise
from lab.simulate import Plan, simulate, split
from learn.daemon import Learner
from tests.servers import server_process
from tests.tiny import tiny_teachable_folder

TOPICS = ["the sea", "the sky", "a fox", "the dog", "paris", "france", "a poem", "the world", "the capital", "hello"]
PROMPTS = [f"write about {topic} {n}" for topic in TOPICS for n in range(8)]
RANKINGS_PER_ROUND = 48
# Rounds at most: the test stops at the first promotion. Where a round lands depends on the machine's float sums
# (the same seeds promoted in round 1 on one CPU and in none of 3 on another), so the margin is in rounds: with
# the seeds shifted 0-4, the first promotion came in round 1, 4, 3, 4 and 1, each version beating v0001.
MAX_ROUNDS = 5


@dataclass
class Loop:
    url: str
    data: Path
    train: list[list[dict[str, str]]]
    held: list[list[dict[str, str]]]


@pytest.fixture
def loop(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[Loop]:
    data = tmp_path / "data"
    import_model(ModelStore(data / "models"), tiny_teachable_folder(tmp_path / "policy", PROMPTS))
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    train, held = split([[{"role": "user", "content": p}] for p in PROMPTS])
    redis.Redis.from_url(redis_server.url).flushdb()
    with server_process(
        data, redis_server.url, "hf", max_model_len=256, max_tokens_limit=32, default_max_tokens=16
    ) as url:
        yield Loop(url, data, train, held)


def served(url: str) -> str:
    return str(httpx.get(f"{url}/healthz", timeout=10).json()["policy_version"])


@pytest.mark.slow
def test_simulated_users_teach_the_served_model_to_be_concise(
    loop: Loop, redis_server: EmbeddedRedis, learn_reward: str
) -> None:
    settings = load_settings(
        learn_reward=learn_reward,
        data_dir=loop.data,
        redis_url=redis_server.url,
        learn_min_rankings=RANKINGS_PER_ROUND,
        learn_min_rm_accuracy=0.55,
        learn_min_rm_heldout_pairs=0,
        learn_ppo_iterations=8,
        learn_prompts_per_iteration=16,
        learn_max_new_tokens=16,
        learn_ppo_lr=1e-3,
        learn_advantage_floor=0.2,
        learn_rm_lr=3e-4,
        learn_rm_epochs=2,
        # The learner as this test was measured with (seeds shifted 0-4 passing, and the zero-reward control
        # failing), on any machine: fp32 products (the default is bf16 where the CPU has bf16 instructions) and a
        # reward model trained on its upper 6 layers, scoring at the last token (the defaults of 2 layers and the
        # mean of every token came later, from the learning curves of real answers), judged on a fifth of the ranked
        # prompts (a tenth left round 1 fewer than the 20 held-out pairs the gate needs). PPO's learning rate 1e-3:
        # at 3e-3 a fifth of the answers came out empty by round 3, and the gate refused them. The advantages'
        # floor as measured, whatever the default.
        learn_bf16=False,
        learn_rm_train_layers=6,
        learn_rm_readout="last",
        learn_rm_held_out=0.2,
        learn_auto_promote=True,
        learn_threads=2,
        learn_prompt_file=loop.data.parent / "prompts.jsonl",
    )
    client = redis.Redis.from_url(redis_server.url)
    learner, registry = Learner(settings, client), Registry(client)
    consumer = FeedbackConsumer(client, Dataset(settings.dataset_path), "test")
    outcomes = []
    while len(outcomes) < MAX_ROUNDS and registry.current()[0] == "v0001":
        plan = Plan(
            loop.url,
            loop.train,
            concise,
            users=1,
            k=4,
            noise=0.1,
            duration_s=600,
            max_rankings=RANKINGS_PER_ROUND,
            max_tokens=16,
            seed=len(outcomes),
            seeded_sampling=True,
        )
        tally = asyncio.run(simulate(plan))
        assert tally.errors == 0 and tally.rankings >= RANKINGS_PER_ROUND, tally
        consumer.drain()
        outcomes.append(learner.tick())
        current = registry.current()[0]
        deadline = time.monotonic() + 60
        while served(loop.url) != current:  # the server follows the promotion
            assert time.monotonic() < deadline, f"the server never switched to {current}"
            time.sleep(0.2)
    current = registry.current()[0]
    assert current != "v0001", outcomes
    store = ModelStore(settings.store_dir)
    result = compare(
        store.path(str(current)),
        store.path("v0001"),
        (str(current), "v0001"),
        "concise",
        concise,
        loop.held,
        per_prompt=16,
        max_new_tokens=16,
        engine="hf",
    )
    logging.getLogger(__name__).info("%s vs v0001: %s; %s", current, result.win_rate, outcomes)
    assert result.length_a < result.length_b, (outcomes, result)
    assert result.win_rate.significant(), (outcomes, result.win_rate)
