"""Hot-swap on the real engine: SmolLM2 v0001 and a perturbed v0002, promoted and rolled back under load.

v0002 is v0001 with its final norm zeroed: every logit is 0, so greedy decoding picks token 0 (a special token)
at every step and its answers are empty, while v0001 writes text. An answer therefore tells which weights wrote
it, even where batching changes v0001's exact greedy text a little: every answer must come from the version it
reports, before, during and after the swaps.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from deploy.launcher import stop_group, wait_healthy
from deploy.model_store import Card, ModelStore
from deploy.promotion import promote, rollback, sync_store
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry
from tests.conftest import free_port
from tests.integration.conftest import ENGINE_START_S, REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration]
GREEDY = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 16, "temperature": 0.0, "n": 1}


def _perturbed(source: Path, target: Path) -> None:
    """v0001 with the final norm's weight zeroed: same shapes, empty greedy answers."""
    from safetensors.torch import load_file, save_file

    for file in source.iterdir():
        if file.suffix != ".safetensors" and file.name != "card.json":
            shutil.copy(file, target / file.name)
    for file in source.glob("*.safetensors"):
        tensors = load_file(file)
        for name in tensors:
            if name == "model.norm.weight":
                tensors[name] = tensors[name] * 0
        save_file(tensors, target / file.name, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def swap_stack(
    real_store: ModelStore, tmp_path_factory: pytest.TempPathFactory, redis_binary: Path | None
) -> Iterator[tuple[str, Registry, ModelStore]]:
    data = tmp_path_factory.mktemp("swap-data")
    store = ModelStore(data / "models")
    shutil.copytree(real_store.path("v0001"), data / "models" / "v0001")
    store.set_current("v0001")
    store.set_reference("v0001")
    store.publish(Card("v0002", "v0001", "test"), lambda f: _perturbed(real_store.path("v0001"), f))
    with EmbeddedRedis(data / "redis", free_port(), executable=redis_binary) as redis_server:
        registry = Registry(Redis.from_url(redis_server.url))
        sync_store(registry, store)
        port = free_port()
        env = {**os.environ, "RANKLOOP_DATA_DIR": str(data), "RANKLOOP_PORT": str(port), "REDIS_URL": redis_server.url}
        process = subprocess.Popen(
            [sys.executable, "-m", "rankloop", "serve"], env=env, start_new_session=True, cwd=REPO
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, timeout_s=ENGINE_START_S)
            yield url, registry, store
        finally:
            stop_group(process)


def _ask(url: str) -> tuple[str, str]:
    body = httpx.post(f"{url}/v1/chat/completions", json=GREEDY, timeout=120).json()
    texts = {c["message"]["content"] for c in body["choices"]}
    assert len(texts) == 1
    return body["policy_version"], texts.pop()


def _wait_for(url: str, version: str, timeout_s: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if httpx.get(f"{url}/healthz", timeout=5).json()["policy_version"] == version:
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError(version)


def test_promote_and_rollback_change_the_weights(swap_stack: tuple[str, Registry, ModelStore]) -> None:
    url, registry, store = swap_stack
    version, first = _ask(url)
    assert version == "v0001"
    promote(registry, store, "v0002", "test", "")
    idle_swap_s = _wait_for(url, "v0002")
    version, second = _ask(url)
    assert first.strip() and (version, second) == ("v0002", "")
    rollback(registry, store, "test", "")
    _wait_for(url, "v0001")
    assert _ask(url) == ("v0001", first)  # the old weights, exactly
    metrics = httpx.get(f"{url}/metrics").text
    assert 'rankloop_swap_seconds_count{phase="load"} 2.0' in metrics
    print(f"idle swap seen by the client after {idle_swap_s:.2f} s")


def test_cycles_under_load_fail_nothing_and_never_mix(swap_stack: tuple[str, Registry, ModelStore]) -> None:
    url, registry, store = swap_stack
    if registry.current()[0] != "v0001":
        rollback(registry, store, "test", "")
    _wait_for(url, "v0001")

    async def load() -> tuple[list[tuple[str, str]], list[Any]]:
        answers: list[tuple[str, str]] = []
        failures: list[Any] = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as http:

            async def client(stream: bool) -> None:
                while not stop.is_set():
                    try:
                        if stream:
                            text, version = [""], ""
                            async with http.stream(
                                "POST", f"{url}/v1/chat/completions", json={**GREEDY, "stream": True}
                            ) as response:
                                async for line in response.aiter_lines():
                                    if line.startswith("data: {"):
                                        import json

                                        chunk = json.loads(line[6:])
                                        version = chunk["policy_version"]
                                        for choice in chunk["choices"]:
                                            text[choice["index"]] += choice["delta"].get("content") or ""
                            answers.extend((version, t) for t in text)
                        else:
                            response = await http.post(f"{url}/v1/chat/completions", json=GREEDY)
                            body = response.json()
                            answers.extend((body["policy_version"], c["message"]["content"]) for c in body["choices"])
                    except Exception as exc:  # any failure is counted, none expected
                        failures.append(exc)

            clients = [asyncio.create_task(client(i % 2 == 0)) for i in range(8)]
            for _ in range(5):
                await asyncio.to_thread(promote, registry, store, "v0002", "test", "cycle")
                await asyncio.to_thread(_wait_for, url, "v0002")
                await asyncio.sleep(1.0)
                await asyncio.to_thread(rollback, registry, store, "test", "cycle")
                await asyncio.to_thread(_wait_for, url, "v0001")
                await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*clients)
        return answers, failures

    answers, failures = asyncio.run(load())
    assert failures == []
    assert {v for v, _ in answers} == {"v0001", "v0002"}
    wrong = [(v, t) for v, t in answers if (v == "v0002") != (t == "")]
    assert wrong == [], wrong[:3]
    assert sum(v == "v0002" for v, _ in answers) > 10 and sum(v == "v0001" for v, _ in answers) > 10


def test_a_corrupt_version_never_reaches_the_engine(swap_stack: tuple[str, Registry, ModelStore]) -> None:
    url, registry, store = swap_stack
    if registry.current()[0] != "v0001":
        rollback(registry, store, "test", "", "v0001")
        _wait_for(url, "v0001")

    def corrupt(folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        for file in store.path("v0001").iterdir():
            if file.suffix != ".safetensors" and file.name != "card.json":
                shutil.copy(file, folder / file.name)
        save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, folder / "model.safetensors")

    store.publish(Card("v0003", "v0001", "test"), corrupt)
    sync_store(registry, store)
    registry.switch("v0003", "v0001", "promote", "test", "bypassing the check")  # as a buggy operator tool might
    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{url}/healthz", timeout=5).json())["swap_error"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "does not fit the served architecture" in health["swap_error"]
    assert (health["status"], health["policy_version"]) == ("ok", "v0001")
    assert registry.show("v0003").state == "failed"
    version, text = _ask(url)
    assert version == "v0001" and text.strip()  # the engine is alive and still on v0001
    registry.switch("v0001", "v0003", "rollback", "test", "restore")


def test_a_second_server_follows_and_catches_up_after_a_restart(swap_stack: tuple[str, Registry, ModelStore]) -> None:
    url, registry, store = swap_stack
    data = store.root.parent
    redis_url = registry.redis.connection_pool.connection_kwargs
    env = {
        **os.environ,
        "RANKLOOP_DATA_DIR": str(data),
        "REDIS_URL": f"redis://{redis_url['host']}:{redis_url['port']}/0",
    }

    def start() -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "rankloop", "serve"],
            env={**env, "RANKLOOP_PORT": str(port)},
            start_new_session=True,
            cwd=REPO,
        )
        second = f"http://127.0.0.1:{port}"
        wait_healthy(second, process, timeout_s=ENGINE_START_S)
        return second, process

    current = registry.current()[0]
    second, process = start()
    try:
        assert httpx.get(f"{second}/healthz").json()["policy_version"] == current
        target = "v0002" if current == "v0001" else "v0001"
        promote(registry, store, target, "test", "both follow")
        _wait_for(url, target)
        _wait_for(second, target)
    finally:
        stop_group(process)
    rollback(registry, store, "test", "while the second is down")
    promote(registry, store, target, "test", "again while it is down")
    latest = registry.current()
    second, process = start()  # a restart serves the registry's current version at once
    try:
        health = httpx.get(f"{second}/healthz").json()
        assert (health["policy_version"], health["epoch"]) == latest
        assert _ask(second)[0] == latest[0]
    finally:
        stop_group(process)
