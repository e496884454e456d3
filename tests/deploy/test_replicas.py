"""Three serving replicas behind nginx, as deploy/compose.yaml runs them, with real processes: real Redis, `rankloop
serve` x3 (fake engine) on one data folder, Debian's nginx with the location block of deploy/docker/nginx.conf (its
upstream lists the replicas' ports here; in compose, Docker's DNS names them). Simulated users chat and rank through
the balancer while an operator promotes a version, one replica is SIGKILLed, another version is promoted while it is
down, and it is started again (compose's `restart: unless-stopped`; here the test restarts it).

Asserted: every replica serves each promotion; nginx stops sending to the dead replica (at most the requests in
flight on it fail; users retry them); the restarted replica catches up on the registry; every ranking the API
accepted is in the dataset, once; every answer is labelled with the version that wrote it."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from deploy.launcher import stop_group, wait_healthy
from deploy.model_store import Card
from deploy.redis_server import EmbeddedRedis
from deploy.settings import load_settings
from feedback.consumer import FeedbackConsumer
from feedback.dataset import Dataset
from tests.conftest import free_port
from tests.servers import balancer, nginx_executable, start_server
from tests.tiny import tiny_versions_store

TOKEN = "replicas-admin-token-0123456789"
LIMITS = {"max_model_len": 256, "max_tokens_limit": 128, "default_max_tokens": 64}
ASK = {"messages": [{"role": "user", "content": "name a colour"}], "n": 2, "max_tokens": 16}
USERS = 4


def nginx() -> str:
    found = nginx_executable()
    if found is None:
        pytest.skip("no nginx for the replicas test: `apt-get install nginx` (Debian, Ubuntu)")
    return found


@dataclass
class Traffic:
    """What the simulated users saw."""

    answers: list[dict[str, object]] = field(default_factory=list)  # every chat answered 200
    accepted: set[str] = field(default_factory=set)  # ids of the rankings the API took
    failed: list[str] = field(default_factory=list)  # requests the balancer could not get answered
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, why: str) -> None:
        with self.lock:
            self.failed.append(why)

    def finish(self, users: list[threading.Thread], timeout_s: float = 60) -> None:
        self.stop.set()
        for thread in users:
            thread.join(timeout=timeout_s)


def assert_accepted_rankings_stored_once(client: redis.Redis, data: Path, traffic: Traffic) -> None:
    """Once the consumer has moved the stream into the data folder's dataset, it holds every ranking the API
    accepted, each once, and nothing else."""
    with Dataset(load_settings(data_dir=data).dataset_path) as dataset:
        FeedbackConsumer(client, dataset, "replicas-test").drain()
        stored = [stored_id for stored_id, _ in dataset.rankings()]
    assert len(stored) == len(set(stored)) == len(traffic.accepted) and set(stored) == traffic.accepted


def weights_named(texts: list[str]) -> set[str | None]:
    """The weights the fake engine says wrote each answer (`answer 0 from v0002: ...`); None where it names none
    (the version a server started on)."""
    return {text.split(" from ", 1)[1].split(":", 1)[0] if " from " in text else None for text in texts}


def user(url: str, name: str, traffic: Traffic, ask: dict[str, object] = ASK) -> None:
    """Chat, then rank the answers; a request that fails is sent again (the same ranking again is answered as a
    duplicate of the first where that one was stored after all)."""
    with httpx.Client(base_url=url, timeout=120) as http:
        while not traffic.stop.is_set():
            try:
                response = http.post("/v1/chat/completions", json=ask)
            except httpx.TransportError as exc:
                traffic.fail(f"chat: {exc!r}")
                continue
            if response.status_code != 200:
                traffic.fail(f"chat: {response.status_code} {response.text[:200]}")
                continue
            body = response.json()
            with traffic.lock:
                traffic.answers.append(body)
            if len(body["choices"]) < 2:
                continue  # one answer: nothing to rank
            ranking = {"comparison_id": body["id"], "ranking": [1, 0], "user": name}
            for _ in range(10):
                try:
                    ranked = http.post("/v1/feedback", json=ranking)
                except httpx.TransportError as exc:
                    traffic.fail(f"ranking: {exc!r}")
                    continue
                if ranked.status_code in (200, 201):  # 200: a duplicate of one stored after all (its reply was lost)
                    with traffic.lock:
                        traffic.accepted.add(ranked.json()["id"])
                    break
                traffic.fail(f"ranking: {ranked.status_code} {ranked.text[:200]}")


def serving(url: str) -> str | None:
    try:
        version: str = httpx.get(url + "/healthz", timeout=2).json()["policy_version"]
        return version
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def all_serve(replicas: list[str], version: str, within_s: float = 15.0) -> float:
    """Seconds until every replica serves `version`."""
    started = time.monotonic()
    while any(serving(r) != version for r in replicas):
        assert time.monotonic() - started < within_s, [(r, serving(r)) for r in replicas]
        time.sleep(0.1)
    return time.monotonic() - started


def promote(url: str, version: str) -> None:
    response = httpx.post(
        url + "/admin/promote",
        json={"version": version, "who": "operator", "reason": "replicas test"},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def test_three_replicas_behind_nginx_follow_promotions_survive_a_kill_and_lose_no_ranking(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    store = tiny_versions_store(tmp_path)  # v0003 has another shape: v0004, a copy of v0002, is promoted instead
    store.publish(Card("v0004", "v0001", "sft"), lambda f: shutil.copytree(store.path("v0002"), f, dirs_exist_ok=True))
    data = store.root.parent
    ports = [free_port() for _ in range(3)]
    settings = {"admin_token": TOKEN, **LIMITS}
    processes = [start_server(data, redis_server.url, "fake", port, **settings) for port in ports]
    replicas = [f"http://127.0.0.1:{port}" for port in ports]
    traffic = Traffic()
    try:
        for replica, process in zip(replicas, processes, strict=True):
            wait_healthy(replica, process, timeout_s=120)
        with balancer(nginx(), ports, tmp_path / "nginx") as url:
            users = [threading.Thread(target=user, args=(url, f"user{i}", traffic)) for i in range(USERS)]
            for thread in users:
                thread.start()
            time.sleep(3)
            promote(url, "v0002")
            all_serve(replicas, "v0002")
            time.sleep(2)

            os.killpg(processes[2].pid, signal.SIGKILL)  # the server and whatever it started, no goodbye
            processes[2].wait()
            with traffic.lock:
                failed_before, answered_before = len(traffic.failed), len(traffic.answers)
            time.sleep(4)  # users go on through the balancer: nginx takes the dead replica out
            with traffic.lock:
                failed_down = len(traffic.failed) - failed_before
                answered_down = len(traffic.answers) - answered_before
            promote(url, "v0004")  # while the replica is down
            all_serve(replicas[:2], "v0004")

            processes[2] = start_server(data, redis_server.url, "fake", ports[2], **settings)
            wait_healthy(replicas[2], processes[2], timeout_s=120)
            all_serve(replicas, "v0004", within_s=5)  # caught up on the registry at its start
            time.sleep(3)
            traffic.finish(users)
    finally:
        traffic.stop.set()
        for process in processes:
            stop_group(process)

    assert_accepted_rankings_stored_once(client, data, traffic)
    client.close()
    assert len(traffic.answers) > 30  # enough traffic to mean something
    assert failed_down <= USERS and answered_down > 10, (traffic.failed, answered_down)
    labels = []
    for body in traffic.answers:
        version = body["policy_version"]
        texts = [choice["message"]["content"] for choice in body["choices"]]  # type: ignore[index]
        # The fake engine names the weights it swapped in; a version a replica started on (v0001, or v0004 after
        # the restart) it does not name.
        named = weights_named(texts)
        assert named in ({version}, {None}) and (named == {version} or version in ("v0001", "v0004")), (version, texts)
        labels.append(version)
    assert {"v0001", "v0002", "v0004"} <= set(labels) and labels[-1] == "v0004"
