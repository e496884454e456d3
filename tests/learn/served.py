"""Rankings through the real HTTP API of a server process and a real Redis server, consumed into the dataset: what
the learner daemon's tests (one process and under torchrun) start from."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from deploy.model_import import import_model
from deploy.model_store import ModelStore
from deploy.redis_server import EmbeddedRedis
from rankloop.cli import app
from tests.servers import server_process
from tests.tiny import tiny_llama_folder

PROMPTS = 40


@pytest.fixture
def server(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[tuple[str, Path]]:
    """`rankloop serve` on the fake engine over the tiny llama's store, in its own process."""
    data = tmp_path / "data"
    import_model(ModelStore(data / "models"), tiny_llama_folder(tmp_path / "src"))
    redis.Redis.from_url(redis_server.url).flushdb()
    with server_process(
        data, redis_server.url, "fake", max_model_len=512, max_tokens_limit=64, default_max_tokens=32
    ) as url:
        yield url, data


def rank_answers(url: str, prompts: int) -> None:
    """Users ask and rank: of K=3 answers the later candidates are preferred (a scripted preference)."""
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(prompts):
            messages = [{"role": "user", "content": f"what is the capital of france {i}"}]
            served = http.post("/v1/chat/completions", json={"messages": messages, "n": 3, "max_tokens": 16})
            assert served.status_code == 200, served.text
            ranked = http.post("/v1/feedback", json={"comparison_id": served.json()["id"], "ranking": [2, 1, 0]})
            assert ranked.status_code == 201, ranked.text


@pytest.fixture
def ranked(
    server: tuple[str, Path], redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, redis.Redis]:
    """PROMPTS rankings through the API, consumed into the dataset; the CLI pointed at this data and Redis."""
    url, data = server
    monkeypatch.setenv("RANKLOOP_DATA_DIR", str(data))
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    rank_answers(url, PROMPTS)
    consumed = CliRunner().invoke(app, ["feedback", "consume", "--once"])
    assert consumed.exit_code == 0, consumed.output
    return data, redis.Redis.from_url(redis_server.url)
