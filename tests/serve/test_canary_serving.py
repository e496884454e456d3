"""A canary's mixed comparisons over the fake engine and a real Redis: in its share of comparisons the candidate
(an adapter on the served weights) writes `split` of the K answers at random positions, each stored with the version
that wrote it; users who prefer the candidate's answers get it promoted by the leaderboard rule, and the replica
follows; a stopped canary mixes nothing."""

from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from deploy.canary import Canaries
from deploy.model_store import ModelStore
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry
from deploy.settings import load_settings
from feedback.comparisons import ComparisonStore
from feedback.consumer import FeedbackConsumer
from feedback.dataset import Dataset
from learn import canary_rule
from tests.serve.replicas import Replica, adapters_store, until, writer

ASK4 = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 32, "n": 4}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return adapters_store(tmp_path)


async def ask(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.post("/v1/chat/completions", json=ASK4)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_a_canary_mixes_its_share_of_comparisons(
    redis: Redis, redis_server: EmbeddedRedis, store: ModelStore, registry: Registry, tokenizer: Any
) -> None:
    replica = Replica(redis, store, tokenizer, web_show_versions=True)
    try:
        Canaries(SyncRedis.from_url(redis_server.url)).start(store, "v0004", share=1.0, split=2, who="ops")
        await until(lambda: replica.served.canary is not None)
        positions = set()
        for _ in range(12):
            body = await ask(replica.http)
            writers = [writer(c["message"]["content"]) for c in body["choices"]]
            assert sorted(writers) == ["v0001", "v0001", "v0004", "v0004"] and body["policy_version"] == "v0001"
            assert [c["policy_version"] for c in body["choices"]] == writers  # shown: the operator turned it on
            positions.add(tuple(i for i, w in enumerate(writers) if w == "v0004"))
            stored = await ComparisonStore(redis, 60).get(body["id"])
            assert stored is not None
            assert [c.policy_version or stored.policy_version for c in stored.candidates] == writers
        assert len(positions) > 1  # the candidate's answers are not always in the same places
        Canaries(SyncRedis.from_url(redis_server.url)).stop("ops")
        await until(lambda: replica.served.canary is None)
        assert {writer(c["message"]["content"]) for c in (await ask(replica.http))["choices"]} == {"v0001"}
    finally:
        await replica.close()


async def test_users_who_prefer_the_candidate_get_it_promoted(
    redis: Redis, redis_server: EmbeddedRedis, store: ModelStore, registry: Registry, tokenizer: Any, tmp_path: Path
) -> None:
    replica = Replica(redis, store, tokenizer)
    settings = load_settings(
        data_dir=store.root.parent, serve_adapters=True, promote_on="canary", canary_min_pairs=40, canary_split=2
    )
    try:
        Canaries(registry.redis).start(store, "v0004", share=0.5, split=2, who="learner")
        await until(lambda: replica.served.canary is not None)
        mixed = 0
        while mixed < 12:
            body = await ask(replica.http)
            assert all(c["policy_version"] is None for c in body["choices"])  # hidden from rankers by default
            writers = [writer(c["message"]["content"]) for c in body["choices"]]
            mixed += len(set(writers)) > 1
            # Users prefer the candidate's answers (the first of each version's, then the rest in order).
            ranking = sorted(range(4), key=lambda i: (writers[i] != "v0004", i))
            ranked = await replica.http.post("/v1/feedback", json={"comparison_id": body["id"], "ranking": ranking})
            assert ranked.status_code == 201, ranked.text
        with Dataset(settings.dataset_path) as dataset:
            FeedbackConsumer(SyncRedis.from_url(redis_server.url), dataset, "canary").drain()
        # 12 mixed rankings, each 4 pairs won by v0004 (48 >= 40): promoted, and the replica follows.
        assert canary_rule.judge(settings, registry, store) == "promoted v0004"
        await until(lambda: replica.served.version == "v0004")
        assert replica.served.canary is None and replica.engine.weights is None  # an adapter switch
    finally:
        await replica.close()


async def test_a_canary_of_the_base_beside_its_adapter(
    redis: Redis, redis_server: EmbeddedRedis, store: ModelStore, registry: Registry, tokenizer: Any
) -> None:
    """The current version an adapter (v0004 on v0001), the candidate the base itself: one engine answers with
    both, the candidate's answers without an adapter."""
    from deploy.promotion import promote

    replica = Replica(redis, store, tokenizer)
    try:
        promote(registry, store, "v0004", "ops", "")
        await until(lambda: replica.served.version == "v0004")
        Canaries(registry.redis).start(store, "v0001", share=1.0, split=1, who="ops")
        await until(lambda: replica.served.canary is not None)
        body = await ask(replica.http)
        assert sorted(writer(c["message"]["content"]) for c in body["choices"]) == ["v0001", "v0004", "v0004", "v0004"]
        stored = await ComparisonStore(redis, 60).get(body["id"])
        assert stored is not None and sorted(c.policy_version or "" for c in stored.candidates) == ["", "", "", "v0001"]
    finally:
        await replica.close()
