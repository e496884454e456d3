"""Hot-swap over the fake engine and a real Redis registry: no failed or mixed answer, catch-up, refusals."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from deploy.model_store import ModelStore
from deploy.promotion import promote, rollback
from deploy.registry import Registry
from tests.serve.replicas import ASK, Replica, until
from tests.tiny import tiny_versions_store


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return tiny_versions_store(tmp_path)


def made_by(body: dict[str, Any]) -> set[str]:
    """The versions whose weights wrote the answers (the fake engine names the folder it loaded)."""
    texts = [c["message"]["content"] for c in body["choices"]]
    return {"v0002" if " from v0002" in t else "v0001" for t in texts}


async def test_a_promotion_is_served_within_a_second(replica: Replica, registry: Registry, store: ModelStore) -> None:
    assert (await replica.http.post("/v1/chat/completions", json=ASK)).json()["policy_version"] == "v0001"
    promote(registry, store, "v0002", "ann", "")
    await until(lambda: replica.served.version == "v0002", timeout=1.0)
    body = (await replica.http.post("/v1/chat/completions", json=ASK)).json()
    assert body["policy_version"] == "v0002" and made_by(body) == {"v0002"}
    health = (await replica.http.get("/healthz")).json()
    assert (health["policy_version"], health["epoch"], health["swap_error"]) == ("v0002", 2, None)
    metrics = (await replica.http.get("/metrics")).text
    assert 'rankloop_swap_seconds_count{phase="load"} 1.0' in metrics


async def test_cycles_under_load_fail_nothing_and_never_mix(
    replica: Replica, registry: Registry, store: ModelStore
) -> None:
    results: list[dict[str, Any]] = []
    failures: list[int] = []
    stop = asyncio.Event()

    async def client(stream: bool) -> None:
        while not stop.is_set():
            if stream:
                async with replica.http.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as r:
                    lines = [
                        json.loads(x[6:]) for x in [line async for line in r.aiter_lines()] if x.startswith("data: {")
                    ]
                    if r.status_code != 200:
                        failures.append(r.status_code)
                        continue
                texts = ["", ""]
                for chunk in lines:
                    for choice in chunk["choices"]:
                        texts[choice["index"]] += choice["delta"].get("content") or ""
                body = {
                    "policy_version": lines[0]["policy_version"],
                    "choices": [{"message": {"content": t}} for t in texts],
                }
            else:
                response = await replica.http.post("/v1/chat/completions", json=ASK)
                if response.status_code != 200:
                    failures.append(response.status_code)
                    continue
                body = response.json()
            results.append(body)

    clients = [asyncio.create_task(client(stream=i % 2 == 0)) for i in range(8)]
    for _ in range(5):
        promote(registry, store, "v0002", "ops", "cycle")
        await until(lambda: replica.served.version == "v0002")
        await asyncio.sleep(0.1)
        rollback(registry, store, "ops", "cycle")
        await until(lambda: replica.served.version == "v0001")
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert len(results) > 40
    versions = {body["policy_version"] for body in results}
    assert versions == {"v0001", "v0002"}
    for body in results:  # every answer written by the weights of the version it reports, never a mix
        assert made_by(body) == {body["policy_version"]}


async def test_a_replica_away_during_promotions_catches_up_to_the_latest_in_one_swap(
    redis: Redis, registry: Registry, store: ModelStore, tokenizer: Any
) -> None:
    # While the replica is down: v0002, back to v0001, v0002 again (epochs 2, 3, 4).
    promote(registry, store, "v0002", "ann", "one")
    rollback(registry, store, "ann", "two")
    promote(registry, store, "v0002", "ann", "three")
    server = Replica(redis, store, tokenizer)
    server.served.version, server.served.epoch = "v0001", 1  # what it served before it went away
    try:
        await until(lambda: server.served.version == "v0002")
        assert server.served.epoch == 4
        metrics = (await server.http.get("/metrics")).text
        assert 'rankloop_swap_seconds_count{phase="load"} 1.0' in metrics  # one swap, straight to the latest
    finally:
        await server.close()


async def test_a_corrupt_version_never_reaches_the_engine(
    replica: Replica, registry: Registry, store: ModelStore
) -> None:
    registry.switch("v0003", "v0001", "promote", "ann", "skipping the check")  # bypasses promote()'s check
    await until(lambda: replica.served.epoch == 2)
    assert replica.served.version == "v0001" and replica.engine.weights is None
    health = (await replica.http.get("/healthz")).json()
    assert "does not fit the served architecture" in health["swap_error"]
    assert registry.show("v0003").state == "failed"
    response = await replica.http.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200 and response.json()["policy_version"] == "v0001"
    assert "rankloop_swap_failures_total 1.0" in (await replica.http.get("/metrics")).text


async def test_two_replicas_follow_one_promotion(
    redis: Redis, registry: Registry, store: ModelStore, tokenizer: Any
) -> None:
    first, second = Replica(redis, store, tokenizer), Replica(redis, store, tokenizer)
    try:
        promote(registry, store, "v0002", "ann", "")
        await until(lambda: first.served.version == second.served.version == "v0002", timeout=1.0)
    finally:
        await first.close()
        await second.close()


def failing_load(replica: Replica, fails: set[str]) -> None:
    """The engine's load fails for these folders after taking part of the weights (the engine then holds them)."""
    load = replica.engine.load_weights

    async def half_then_fail(folder: Path) -> None:
        if folder.name in fails:
            replica.engine.weights = f"half of {folder.name}"
            raise RuntimeError(f"out of memory loading {folder.name}")
        await load(folder)

    replica.engine.load_weights = half_then_fail  # type: ignore[method-assign]


async def test_a_load_that_fails_halfway_loads_the_old_weights_back(
    replica: Replica, registry: Registry, store: ModelStore
) -> None:
    failing_load(replica, {"v0002"})
    promote(registry, store, "v0002", "ann", "")
    await until(lambda: replica.served.epoch == 2)
    assert replica.served.version == "v0001" and replica.engine.weights == "v0001"  # loaded back, whole
    response = await replica.http.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200 and response.json()["policy_version"] == "v0001"
    assert made_by(response.json()) == {"v0001"}
    assert "out of memory loading v0002" in (await replica.http.get("/healthz")).json()["swap_error"]
    assert registry.show("v0002").state == "failed"


async def test_a_server_that_cannot_load_the_old_weights_back_answers_503_until_a_rollback_loads_them(
    replica: Replica, registry: Registry, store: ModelStore
) -> None:
    sound_load = replica.engine.load_weights
    failing_load(replica, {"v0002", "v0001"})
    promote(registry, store, "v0002", "ann", "")
    await until(lambda: replica.served.broken is not None)
    response = await replica.http.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 503 and response.headers["retry-after"] == "30"
    assert "serves nothing until a promotion or rollback" in response.json()["error"]["message"]
    streamed = await replica.http.post("/v1/chat/completions", json={**ASK, "stream": True})
    assert streamed.status_code == 503  # refused before the stream starts, never a 200 with no answer
    health = await replica.http.get("/healthz")
    assert health.status_code == 503 and health.json()["engine"] == "no weights"
    replica.engine.load_weights = sound_load  # type: ignore[method-assign]  # the operator freed the memory
    rollback(registry, store, "ann", "v0002 does not load")
    await until(lambda: replica.served.broken is None)
    assert replica.engine.weights == "v0001"
    response = await replica.http.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200 and made_by(response.json()) == {"v0001"}
