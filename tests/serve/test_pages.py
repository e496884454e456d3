"""The web app's HTTP side: the pages and their files with their security headers, `/ui/config`, and the admin
routes the console reads (learner, history, feedback), with exact figures."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from deploy.learner_status import STATUS_KEY
from deploy.model_store import Card, ModelStore
from deploy.redis_server import EmbeddedRedis
from deploy.settings import Settings, load_settings
from feedback.consumer import FeedbackConsumer
from feedback.dataset import Dataset
from feedback.history import thinned
from serve.app import create_app
from serve.fake_engine import FakeEngine
from tests.feedback.helpers import demonstration_json

TOKEN = "pages-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(tmp_path: Path, redis_server: EmbeddedRedis) -> Settings:
    return load_settings(
        data_dir=tmp_path,
        redis_url=redis_server.url,
        admin_token=TOKEN,
        default_n=3,
        default_max_tokens=48,
        max_model_len=256,
        max_tokens_limit=128,
    )


@pytest.fixture
async def web(settings: Settings, engine: FakeEngine, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, engine, redis, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


async def test_pages_and_their_files_come_with_security_headers(web: httpx.AsyncClient) -> None:
    for path, kind, marker in (
        ("/", "text/html", 'src="/static/chat.js"'),
        ("/console", "text/html", 'src="/static/console.js"'),
        ("/static/chat.js", "text/javascript", "streamChat"),
        ("/static/vendor/Sortable.min.js", "text/javascript", "Sortable 1.15.7 - MIT"),
        ("/static/style.css", "text/css", ".answers"),
    ):
        answer = await web.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith(kind), path
        assert marker in answer.text, path
        assert answer.headers["content-security-policy"].startswith("default-src 'self'"), path
        assert answer.headers["x-content-type-options"] == "nosniff"
    for escape in ("/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fpages.py"):
        assert (await web.get(httpx.URL(f"http://test{escape}"))).status_code == 404, escape
    missing = await web.get("/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


async def test_ui_config_tells_the_page_what_this_server_does(web: httpx.AsyncClient) -> None:
    config = (await web.get("/ui/config")).json()
    assert config == {
        "default_n": 3,
        "max_n": 9,
        "default_max_tokens": 48,
        "show_versions": False,
        "auth": "open",
        "policy_version": "v0001",
    }


async def test_console_routes_need_the_admin_token(web: httpx.AsyncClient) -> None:
    for path in ("/admin/learner", "/admin/history", "/admin/feedback"):
        assert (await web.get(path)).status_code == 401, path
        wrong = await web.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"]["message"] == "wrong admin token"


async def test_learner_status_as_the_learner_published_it(web: httpx.AsyncClient, redis: Redis) -> None:
    assert (await web.get("/admin/learner", headers=ADMIN)).json() == {"status": None}
    status = {"phase": "ppo", "detail": "iteration 2/6", "iteration": 2, "iterations": 6, "updated": 5.0}
    await redis.set(STATUS_KEY, json.dumps(status))
    assert (await web.get("/admin/learner", headers=ADMIN)).json() == {"status": status}


async def _rank(web: httpx.AsyncClient) -> str:
    """A comparison asked for and ranked through the API; returns the ranking's event id."""
    chat = await web.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2})
    ranked = await web.post("/v1/feedback", json={"comparison_id": chat.json()["id"], "ranking": [1, 0]})
    assert ranked.status_code == 201, ranked.text
    event_id: str = ranked.json()["id"]
    return event_id


def _consume(server: EmbeddedRedis, settings: Settings) -> None:
    client = SyncRedis.from_url(server.url)
    with Dataset(settings.dataset_path) as dataset:
        FeedbackConsumer(client, dataset, "pages").drain()
    client.close()


async def test_history_gives_the_series_rankloop_report_plots(
    web: httpx.AsyncClient, settings: Settings, redis_server: EmbeddedRedis
) -> None:
    now = time.time()
    rewards = ModelStore(settings.reward_store_dir, prefix="r")
    rewards.publish(
        Card("r0001", "v0001", "reward_model", details={"eval": {"accuracy": 0.75}}),
        lambda f: [
            (f / name).write_text("{}") for name in ("config.json", "tokenizer_config.json", "model.safetensors")
        ],
    )
    runs = settings.data_dir / "runs"
    runs.mkdir()
    rows = [{"step": i, "time": now + i, "reward": 0.5 * i, "kl_per_answer": 1.0} for i in range(1, 4)]
    (runs / "v0001-ppo-r0001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accepted = [await _rank(web) for _ in range(2)]
    _consume(redis_server, settings)

    found = (await web.get("/admin/history", headers=ADMIN)).json()
    assert found["rankings"] == [[int(a.split("-")[0]) / 1000, float(n)] for n, a in enumerate(accepted, start=1)]
    assert [v for _, v in found["rm_accuracy"]] == [0.75]
    assert found["ppo"]["reward"] == [[now + 1, 0.5], [now + 2, 1.0], [now + 3, 1.5]]
    assert found["ppo"]["kl_per_answer"] == [[now + i, 1.0] for i in range(1, 4)]
    assert found["win_rates"] == {} and found["win_labels"] == {}
    two = (await web.get("/admin/history?points=2", headers=ADMIN)).json()
    assert two["ppo"]["reward"] == [[now + 1, 0.5], [now + 3, 1.5]]  # the first and the last


async def test_feedback_health_counts_what_is_stored(
    web: httpx.AsyncClient, settings: Settings, redis_server: EmbeddedRedis
) -> None:
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([(f"{5_000 + i}-0", "demonstration", demonstration_json(i)) for i in range(2)])
    await _rank(web)
    await _rank(web)
    before = (await web.get("/admin/feedback", headers=ADMIN)).json()
    # Two rankings, each with its comparison entry, wait in the stream; no consumer group yet.
    assert before["stream"] == {
        "length": 4,
        "pending": 0,
        "lag": 4,
        "consumers": 0,
        "group_exists": False,
        "max_backlog": settings.feedback_max_backlog,
    }
    _consume(redis_server, settings)
    health = (await web.get("/admin/feedback", headers=ADMIN)).json()
    assert health["dataset"] == {"ranking": 2, "demonstration": 2}
    assert health["comparisons"] == 2 and health["rejected"] == 0
    assert health["stream"]["lag"] == 0 and health["stream"]["pending"] == 0 and health["stream"]["group_exists"]
    assert health["redis_memory"]["used_bytes"] > 0 and health["warnings"] == []


def test_thinned_keeps_evenly_spaced_points_and_the_last() -> None:
    series = [(float(t), float(t * t)) for t in range(10)]
    # at most 4: a step of 10 / 3 picks positions 0, 3 (3.33) and 6 (6.67), then the last.
    assert thinned(series, 4) == [(0.0, 0.0), (3.0, 9.0), (6.0, 36.0), (9.0, 81.0)]
    assert thinned(series, 10) == series and thinned(series, 50) == series
