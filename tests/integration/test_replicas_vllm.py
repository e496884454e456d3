"""Replicas behind nginx with the real engine among them: two `rankloop serve` with the fake engine and one with
vLLM and SmolLM2, on one data folder and Redis. Users chat (greedy) and rank through nginx while v0002 (v0001 with
its final norm zeroed: the same shapes, empty greedy answers) is promoted: every replica serves it, the vLLM one
after loading its weights; every answer is labelled with the version that wrote it (the fake engine names its
weights; vLLM's greedy answers are empty exactly under v0002); every accepted ranking reaches the dataset once."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import redis

from deploy.launcher import stop_group, wait_healthy
from deploy.model_store import Card, ModelStore
from deploy.redis_server import EmbeddedRedis
from tests.conftest import free_port
from tests.deploy.test_replicas import (
    TOKEN,
    Traffic,
    all_serve,
    assert_accepted_rankings_stored_once,
    nginx,
    promote,
    user,
    weights_named,
)
from tests.integration.conftest import ENGINE_START_S
from tests.integration.test_swap_vllm import _perturbed
from tests.servers import balancer, start_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]
GREEDY = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 24, "temperature": 0.0, "n": 1}
SAMPLED = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 24, "temperature": 1.0, "n": 2}


def test_a_real_engine_replica_behind_nginx_follows_a_promotion_with_every_answer_labelled(
    real_store: ModelStore, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    data = tmp_path / "data"
    store = ModelStore(data / "models")
    shutil.copytree(real_store.path("v0001"), store.root / "v0001")
    store.set_current("v0001")
    store.set_reference("v0001")
    store.publish(Card("v0002", "v0001", "test"), lambda f: _perturbed(real_store.path("v0001"), f))
    ports = [free_port() for _ in range(3)]
    engines = ["fake", "fake", "vllm"]
    processes = [
        start_server(data, redis_server.url, engine, port, admin_token=TOKEN)
        for engine, port in zip(engines, ports, strict=True)
    ]
    replicas = [f"http://127.0.0.1:{port}" for port in ports]
    traffic = Traffic()
    try:
        for replica, process in zip(replicas, processes, strict=True):
            wait_healthy(replica, process, timeout_s=ENGINE_START_S)
        with balancer(nginx(), ports, tmp_path / "nginx") as url:
            # Two users ask for one greedy answer (its text tells the versions apart), one for two answers to rank.
            asks = [GREEDY, GREEDY, SAMPLED]
            users = [threading.Thread(target=user, args=(url, f"user{i}", traffic, ask)) for i, ask in enumerate(asks)]
            for thread in users:
                thread.start()
            time.sleep(10)
            promote(url, "v0002")
            all_serve(replicas, "v0002", within_s=120)
            time.sleep(10)
            traffic.finish(users, timeout_s=180)
    finally:
        traffic.stop.set()
        for process in processes:
            stop_group(process)

    assert_accepted_rankings_stored_once(client, data, traffic)
    client.close()
    assert not traffic.failed, traffic.failed[:5]
    real: dict[str, int] = {"v0001": 0, "v0002": 0}
    for body in traffic.answers:
        version = str(body["policy_version"])
        texts = [choice["message"]["content"] for choice in body["choices"]]  # type: ignore[index]
        if all(text.startswith("answer ") for text in texts):  # the fake engine's
            assert weights_named(texts) == ({version} if version == "v0002" else {None}), (version, texts)
        elif len(texts) == 1:  # vLLM's, greedy: v0001 names a fruit, v0002 answers nothing
            assert (texts[0].strip() == "") == (version == "v0002"), (version, texts)
            real[version] += 1
    assert real["v0001"] > 0 and real["v0002"] > 0, real
    assert len(traffic.accepted) > 5
