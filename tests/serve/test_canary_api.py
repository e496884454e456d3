"""The canary and the leaderboard through the admin API: start, status with the standings since it started, the
leaderboard of users' rankings, stop with a rejection; refusals and bad bodies are 4xx that say what to fix."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry
from deploy.settings import Settings, load_settings
from feedback.dataset import Dataset
from serve.app import create_app
from serve.fake_engine import FakeEngine
from tests.feedback.test_standings import CANDIDATE_FIRST, CURRENT_FIRST, ranking
from tests.tiny import publish_adapter_version, tiny_versions_store

TOKEN = "canary-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(tmp_path: Path, redis_server: EmbeddedRedis) -> Settings:
    store = tiny_versions_store(tmp_path)  # v0001 current, v0002 and v0003 full weights
    publish_adapter_version(store, "v0004")
    return load_settings(data_dir=tmp_path, redis_url=redis_server.url, admin_token=TOKEN, serve_adapters=True)


@pytest.fixture
async def web(settings: Settings, engine: FakeEngine, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    await redis.flushdb()
    app = create_app(settings, engine, redis, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


async def test_routes_need_the_admin_token(web: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/admin/canary"), ("POST", "/admin/canary/start"), ("GET", "/admin/leaderboard")):
        assert (await web.request(method, path, json={} if method == "POST" else None)).status_code == 401, path


async def test_a_canary_through_the_api(
    web: httpx.AsyncClient, settings: Settings, redis_server: EmbeddedRedis
) -> None:
    assert (await web.get("/admin/canary", headers=ADMIN)).json() == {"canary": None, "standings": None}
    started = await web.post("/admin/canary/start", headers=ADMIN, json={"version": "v0004", "share": 0.5, "split": 1})
    assert started.status_code == 200, started.text
    canary = started.json()["canary"]
    assert (canary["version"], canary["current"], canary["share"], canary["split"]) == ("v0004", "v0001", 0.5, 1)
    now = int(time.time() * 1000) + 1000
    rows = [ranking(n, now + n, CANDIDATE_FIRST if n % 4 else CURRENT_FIRST) for n in range(8)]
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([(i, k, d.replace('"v0002"', '"v0004"')) for i, k, d in rows])
    status = (await web.get("/admin/canary", headers=ADMIN)).json()
    [versus] = status["standings"]["against_current"]
    assert (versus["candidate"], versus["rate"], versus["pairs"], versus["rankings"]) == ("v0004", 0.75, 32, 8)
    board = (await web.get("/admin/leaderboard", headers=ADMIN)).json()
    assert list(board["strengths"]) == ["v0004", "v0001"] and board["current"] == "v0001"
    later = (await web.get(f"/admin/leaderboard?since={now / 1000 + 60}", headers=ADMIN)).json()
    assert later["rankings"] == 0
    stopped = await web.post("/admin/canary/stop", headers=ADMIN, json={"reject": True, "reason": "users prefer v0001"})
    assert stopped.json() == {"stopped": "v0004", "rejected": True}
    registry = Registry(SyncRedis.from_url(redis_server.url))
    assert registry.show("v0004").state == "rejected"
    assert registry.events()[-1].why == "rejected: users prefer v0001"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"version": "v0002"}, 400, "v0002 runs on v0002's weights and v0001 on v0001's"),
        ({"version": "v0009"}, 400, "version v0009 is not registered"),
        ({"version": "v0004", "share": 0}, 400, "share: Input should be greater than 0"),
        ({"version": "v0004", "split": 0}, 400, "split: Input should be greater than or equal to 1"),
        ({"version": "v0004", "shares": 0.5}, 400, "unknown field 'shares'"),
    ],
)
async def test_refusals_say_what_to_fix(
    web: httpx.AsyncClient, body: dict[str, object], status: int, says: str
) -> None:
    answer = await web.post("/admin/canary/start", headers=ADMIN, json=body)
    assert answer.status_code == status, answer.text
    assert says in answer.text
    assert (await web.get("/admin/canary", headers=ADMIN)).json()["canary"] is None
    stop = await web.post("/admin/canary/stop", headers=ADMIN, json={})
    assert stop.status_code == 400 and "no canary is running" in stop.text


async def test_no_canary_where_servers_answer_with_one_version(
    settings: Settings, engine: FakeEngine, redis: Redis
) -> None:
    await redis.flushdb()
    app = create_app(settings.model_copy(update={"serve_adapters": False}), engine, redis, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as web:
        answer = await web.post("/admin/canary/start", headers=ADMIN, json={"version": "v0004"})
    assert answer.status_code == 409 and "RANKLOOP_SERVE_ADAPTERS=true" in answer.text
