"""Versions kept as adapters on the served weights are switched to with no drain and no reload, over the fake
engine and a real Redis registry: under 8 streaming clients nothing fails, every answer is written by the adapter
of the version it is labelled with, and an answer under way when a promotion lands finishes on its own version."""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.model_store import ModelStore
from deploy.promotion import promote, rollback
from deploy.registry import Registry
from tests.serve.replicas import ADAPTERS, ASK, Replica, adapters_store, until, writer


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return adapters_store(tmp_path)


async def streamed(http: httpx.AsyncClient, ask: dict[str, Any]) -> tuple[int, str, list[str]]:
    """(status, the label, each choice's text) of one streamed answer."""
    async with http.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as response:
        lines = [json.loads(x[6:]) for x in [line async for line in response.aiter_lines()] if x.startswith("data: {")]
    texts = [""] * ask["n"]
    for chunk in lines:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    return response.status_code, lines[0]["policy_version"] if lines else "", texts


async def test_adapter_switches_under_8_streaming_clients(
    replica: Replica, registry: Registry, store: ModelStore
) -> None:
    results: list[tuple[int, str, list[str]]] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            results.append(await streamed(replica.http, ASK))

    clients = [asyncio.create_task(client()) for _ in range(8)]
    for target in ("v0004", "v0005", "v0004"):
        promote(registry, store, target, "ops", "switch")
        await until(lambda: replica.served.version == target)  # noqa: B023
        assert replica.served.last_swap is not None and replica.served.last_swap.drain_s == 0.0
        await asyncio.sleep(0.2)
    rollback(registry, store, "ops", "back to the base", target="v0001")
    await until(lambda: replica.served.version == "v0001")
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*clients)
    assert [status for status, _, _ in results if status != 200] == []
    assert {label for _, label, _ in results} == {"v0001", *ADAPTERS}
    for _, label, texts in results:  # every answer by the version it is labelled with, never a mix
        assert {writer(t) for t in texts} == {label}
    assert replica.engine.weights is None  # no reload: the engine kept v0001's weights throughout
    assert replica.engine.adapters == ["v0004", "v0005", "v0004"]


async def test_an_answer_under_way_finishes_on_its_own_version(
    replica: Replica, registry: Registry, store: ModelStore
) -> None:
    replica.engine.step_s = 0.05
    long = asyncio.create_task(streamed(replica.http, {**ASK, "n": 1}))
    await until(lambda: replica.served.in_flight == 1)
    started = time.monotonic()
    promote(registry, store, "v0004", "ops", "")
    await until(lambda: replica.served.version == "v0004")
    switched = time.monotonic() - started
    assert not long.done()  # the switch did not wait for it
    status, label, [text] = await long
    assert (status, label, writer(text)) == (200, "v0001", "v0001")
    after = await replica.http.post("/v1/chat/completions", json=ASK)
    assert after.json()["policy_version"] == "v0004"
    assert {writer(c["message"]["content"]) for c in after.json()["choices"]} == {"v0004"}
    assert switched < 1.0


async def test_a_version_on_other_weights_still_reloads(
    replica: Replica, registry: Registry, store: ModelStore
) -> None:
    promote(registry, store, "v0004", "ops", "")
    await until(lambda: replica.served.version == "v0004")
    promote(registry, store, "v0002", "ops", "full weights")  # a copy of v0001: not an adapter of it
    await until(lambda: replica.served.version == "v0002")
    assert replica.engine.weights == "v0002" and replica.served.base == "v0002" and replica.served.adapter is None
    body = (await replica.http.post("/v1/chat/completions", json=ASK)).json()
    assert {writer(c["message"]["content"]) for c in body["choices"]} == {"v0002"}
    promote(registry, store, "v0005", "ops", "")  # back on v0001's weights, with v0005's adapter
    await until(lambda: replica.served.version == "v0005")
    assert replica.engine.weights == "v0001" and replica.served.base == "v0001"
    body = (await replica.http.post("/v1/chat/completions", json=ASK)).json()
    assert {writer(c["message"]["content"]) for c in body["choices"]} == {"v0005"}
