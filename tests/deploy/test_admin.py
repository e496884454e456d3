"""The admin HTTP API: bearer token (401 without, 403 wrong), list, promote, conflicts, rollback, events."""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.redis_server import EmbeddedRedis
from deploy.settings import load_settings
from serve.app import create_app
from serve.fake_engine import FakeEngine
from tests.tiny import tiny_versions_store

TOKEN = "s3cret-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _app(
    tmp_path: Path, redis: Redis, redis_server: EmbeddedRedis, tokenizer: Any, token: str | None, auth: str = "open"
) -> Any:
    store = tiny_versions_store(tmp_path)
    settings = load_settings(
        max_model_len=256,
        max_tokens_limit=128,
        default_max_tokens=64,
        redis_url=redis_server.url,
        data_dir=store.root.parent,
        admin_token=token,
        auth=auth,
    )
    return create_app(settings, FakeEngine(tokenizer, 256), redis, "v0001")


@pytest.fixture
async def admin(
    tmp_path: Path, redis: Redis, redis_server: EmbeddedRedis, tokenizer: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = _app(tmp_path, redis, redis_server, tokenizer, TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        yield http


async def test_the_token_is_required_and_checked(admin: httpx.AsyncClient) -> None:
    missing = await admin.get("/admin/versions")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = await admin.get("/admin/versions", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["message"] == "wrong admin token"
    chat = await admin.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200  # users never need the token


async def test_list_promote_conflict_rollback_and_events(admin: httpx.AsyncClient) -> None:
    listed = (await admin.get("/admin/versions", headers=AUTH)).json()
    assert (listed["current"], listed["epoch"]) == ("v0001", 1)
    assert [v["state"] for v in listed["versions"]] == ["current", "ready", "ready"]
    promoted = await admin.post(
        "/admin/promote", headers=AUTH, json={"version": "v0002", "reason": "evals", "who": "ann"}
    )
    assert promoted.json() == {"current": "v0002", "epoch": 2}
    stale = await admin.post("/admin/promote", headers=AUTH, json={"version": "v0001", "expected": "v0001"})
    assert stale.status_code == 409 and "someone changed it first" in stale.json()["error"]["message"]
    refused = await admin.post("/admin/promote", headers=AUTH, json={"version": "v0003"})
    assert refused.status_code == 400 and "does not fit" in refused.json()["error"]["message"]
    stale_back = await admin.post("/admin/rollback", headers=AUTH, json={"reason": "late", "expected": "v0001"})
    assert stale_back.status_code == 409 and "not v0001" in stale_back.json()["error"]["message"]
    back = await admin.post("/admin/rollback", headers=AUTH, json={"reason": "complaints", "expected": "v0002"})
    assert back.json() == {"current": "v0001", "epoch": 3}
    shown = (await admin.get("/admin/versions/v0003", headers=AUTH)).json()
    assert shown["state"] == "failed"
    events = (await admin.get("/admin/events", headers=AUTH)).json()["events"]
    assert [(e["action"], e["version"], e["who"]) for e in events] == [
        ("init", "v0001", "rankloop"),
        ("promote", "v0002", "ann"),
        ("rollback", "v0001", "admin-api"),
    ]
    later = (await admin.get(f"/admin/events?after={events[1]['id']}", headers=AUTH)).json()["events"]
    assert [e["epoch"] for e in later] == [3]
    newest = (await admin.get("/admin/events?newest=true&count=2", headers=AUTH)).json()["events"]
    assert [e["epoch"] for e in newest] == [2, 3]  # the newest two, oldest first


@pytest.mark.parametrize("after", ["abc", "1-2-3", "-1", "(1", ""])
async def test_a_bad_event_id_is_400_naming_it(admin: httpx.AsyncClient, after: str) -> None:
    response = await admin.get("/admin/events", params={"after": after}, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "after" and "should match pattern" in error["message"]


async def test_an_event_id_beyond_64_bits_is_400_not_a_redis_error(admin: httpx.AsyncClient) -> None:
    response = await admin.get("/admin/events", params={"after": "94098142493396444558"}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "after", response.text


async def test_without_a_token_the_admin_api_is_off(
    tmp_path: Path, redis: Redis, redis_server: EmbeddedRedis, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(tmp_path, redis, redis_server, tokenizer, None)
    assert "admin API disabled" in caplog.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        response = await http.get("/admin/versions", headers=AUTH)
    assert response.status_code == 404 and "set RANKLOOP_ADMIN_TOKEN" in response.json()["error"]["message"]


async def test_registry_changes_from_another_sites_page_are_refused(
    tmp_path: Path, redis: Redis, redis_server: EmbeddedRedis, tokenizer: Any
) -> None:
    store = tiny_versions_store(tmp_path)
    settings = load_settings(
        redis_url=redis_server.url,
        data_dir=store.root.parent,
        admin_token=TOKEN,
        allowed_origins=["https://console.example"],
    )
    app = create_app(settings, FakeEngine(tokenizer, 256), redis, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as admin:
        await admin.get("/admin/versions", headers=AUTH)
        promote = {"version": "v0002", "reason": "evals"}
        elsewhere = await admin.post("/admin/promote", headers={**AUTH, "origin": "http://evil.example"}, json=promote)
        assert elsewhere.status_code == 403 and elsewhere.json()["error"]["code"] == "cross_site"
        plain = await admin.post(
            "/admin/rollback", headers={**AUTH, "content-type": "text/plain"}, content=json.dumps({"reason": "x"})
        )
        assert plain.status_code == 415
        assert (await admin.get("/admin/versions", headers=AUTH)).json()["epoch"] == 1  # nothing changed
        listed = await admin.post("/admin/promote", headers={**AUTH, "origin": "https://console.example"}, json=promote)
        assert listed.json() == {"current": "v0002", "epoch": 2}  # an origin the operator allows


async def test_an_admin_key_operates_under_its_own_name(
    tmp_path: Path, redis: Redis, redis_server: EmbeddedRedis, tokenizer: Any
) -> None:
    import redis as sync_redis_module

    from deploy.keys import KeyStore

    keys = KeyStore(sync_redis_module.Redis.from_url(redis_server.url))
    ops = {"Authorization": f"Bearer {keys.create('ops', 'admin')}"}
    app = _app(tmp_path, redis, redis_server, tokenizer, None, auth="keys")  # no admin token: keys alone
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        promoted = await http.post("/admin/promote", headers=ops, json={"version": "v0002", "who": "someone-else"})
        assert promoted.status_code == 200, promoted.text
        events = (await http.get("/admin/events", headers=ops)).json()["events"]
    assert [(e["action"], e["who"]) for e in events] == [("init", "rankloop"), ("promote", "ops")]
