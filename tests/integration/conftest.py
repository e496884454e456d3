"""The real stack: v0001 converted from the bundled GGUF, a real Redis server, `rankloop serve` with vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.launcher import stop_group, wait_healthy
from deploy.model_store import ModelStore
from deploy.redis_server import EmbeddedRedis
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
# Converting the GGUF takes ~40 s: keep the result between runs (var/ is ignored by git).
TEST_DATA = Path(os.environ.get("RANKLOOP_TEST_DATA", REPO / "var" / "test-data"))
ENGINE_START_S = 300


@dataclass
class Stack:
    base_url: str
    redis: EmbeddedRedis
    store: ModelStore
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def real_store() -> ModelStore:
    store = ModelStore(TEST_DATA / "models")
    if store.current() is None:
        from deploy.model_import import import_model

        import_model(store)
    return store


@pytest.fixture(scope="session")
def stack(real_store: ModelStore, redis_server: EmbeddedRedis) -> Iterator[Stack]:
    port = free_port()
    env = {
        **os.environ,
        "RANKLOOP_DATA_DIR": str(TEST_DATA),
        "RANKLOOP_PORT": str(port),
        "REDIS_URL": redis_server.url,
    }
    process = subprocess.Popen([sys.executable, "-m", "rankloop", "serve"], env=env, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout_s=ENGINE_START_S)
        yield Stack(url, redis_server, real_store, process)
    finally:
        stop_group(process)  # the engine core is a child of the server: stop the whole group
