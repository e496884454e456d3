"""API keys (RANKLOOP_AUTH=keys) on chat, feedback and admin routes, over the fake engine and a real Redis."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis_module
from redis.asyncio import Redis
from typer.testing import CliRunner

from deploy.auth import ExposedError, check_exposure, is_loopback
from deploy.keys import KEYS_KEY, LIVE_KEY, KeyStore, digest
from deploy.redis_server import EmbeddedRedis
from deploy.settings import load_settings
from feedback.stream import STREAM_KEY
from serve.app import create_app
from serve.fake_engine import FakeEngine

ASK = {"messages": [{"role": "user", "content": "hello world"}], "n": 2, "max_tokens": 8, "temperature": 0.7}


@pytest.fixture
def keys(redis_server: EmbeddedRedis) -> KeyStore:
    return KeyStore(sync_redis_module.Redis.from_url(redis_server.url))


@pytest.fixture
async def app_client(
    engine: FakeEngine, redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        auth="keys",
        redis_url=redis_server.url,
        data_dir=tmp_path,
        max_model_len=256,
        max_tokens_limit=128,
        default_max_tokens=64,
    )
    app = create_app(settings, engine, redis, "v0001")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _ask(client: httpx.AsyncClient, key: str) -> str:
    response = await client.post("/v1/chat/completions", json=ASK, headers=bearer(key))
    assert response.status_code == 200, response.text
    comparison_id: str = response.json()["id"]
    return comparison_id


async def _rank(client: httpx.AsyncClient, key: str, comparison_id: str, **extra: Any) -> httpx.Response:
    body = {"comparison_id": comparison_id, "ranking": [1, 0], **extra}
    return await client.post("/v1/feedback", json=body, headers=bearer(key))


async def test_without_a_key_nothing_is_served_or_stored(app_client: httpx.AsyncClient, redis: Redis) -> None:
    for path, body in (("/v1/chat/completions", ASK), ("/v1/feedback", {"comparison_id": "c", "ranking": [0, 1]})):
        response = await app_client.post(path, json=body)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer <key>" in response.json()["error"]["message"]
    response = await app_client.post("/v1/chat/completions", json=ASK, headers=bearer("rk_made-up"))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert await redis.dbsize() == 0


async def test_a_ranking_is_its_keys_and_only_the_asker_or_a_rater_may_rank(
    app_client: httpx.AsyncClient, keys: KeyStore, redis: Redis
) -> None:
    ann, bob, rita = keys.create("ann", "user"), keys.create("bob", "user"), keys.create("rita", "rater")
    asked = await _ask(app_client, ann)
    stored = await redis.hget(f"rankloop:comparison:{asked}", "asker")
    assert stored == b"ann"

    refused = await _rank(app_client, bob, asked)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_your_comparison"
    mismatch = await _rank(app_client, ann, asked, user="somebody-else")
    assert mismatch.status_code == 403 and mismatch.json()["error"]["param"] == "user"
    assert await redis.xlen(STREAM_KEY) == 0  # neither refusal stored anything

    assert (await _rank(app_client, ann, asked, user="ann")).status_code == 201
    assert (await _rank(app_client, rita, asked)).status_code == 201
    events = await redis.xrange(STREAM_KEY)
    import json

    users = [json.loads(fields[b"data"])["user"] for _, fields in events if fields[b"kind"] == b"ranking"]
    assert users == ["ann", "rita"]  # the keys' names, whatever the body said


async def test_a_demonstration_on_someone_elses_comparison_is_refused(
    app_client: httpx.AsyncClient, keys: KeyStore, redis: Redis
) -> None:
    ann, bob = keys.create("ann", "user"), keys.create("bob", "user")
    asked = await _ask(app_client, ann)
    body = {"comparison_id": asked, "answer": "A better answer."}
    refused = await app_client.post("/v1/demonstrations", json=body, headers=bearer(bob))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_your_comparison"
    accepted = await app_client.post("/v1/demonstrations", json=body, headers=bearer(ann))
    assert accepted.status_code == 201
    assert await redis.xlen(STREAM_KEY) == 1


async def test_a_revoked_key_stops_at_once(app_client: httpx.AsyncClient, keys: KeyStore) -> None:
    ann = keys.create("ann", "user")
    await _ask(app_client, ann)
    assert keys.revoke("ann") == 1
    response = await app_client.post("/v1/chat/completions", json=ASK, headers=bearer(ann))
    assert response.status_code == 401
    again = keys.create("ann", "user")  # the name is free again
    assert again != ann and (await app_client.post("/v1/chat/completions", json=ASK, headers=bearer(again))).is_success


async def test_the_admin_api_wants_an_admin_key(app_client: httpx.AsyncClient, keys: KeyStore) -> None:
    user, rater, admin = keys.create("u", "user"), keys.create("r", "rater"), keys.create("a", "admin")
    assert (await app_client.get("/admin/versions")).status_code == 401
    for key in (user, rater):
        response = await app_client.get("/admin/versions", headers=bearer(key))
        assert response.status_code == 403 and "needs admin" in response.json()["error"]["message"]
    response = await app_client.get("/admin/events", headers=bearer(admin))
    assert response.status_code == 200 and response.json() == {"events": []}


def test_keys_are_stored_hashed_and_listed_with_their_history(keys: KeyStore) -> None:
    keys.redis.delete(KEYS_KEY, LIVE_KEY)
    key = keys.create("ann", "rater")
    assert key.startswith("rk_") and len(key) > 40
    raw = keys.redis.hgetall(KEYS_KEY)
    assert list(raw) == [digest(key).encode()] and key.encode() not in b"".join(raw.values())
    with pytest.raises(ValueError, match="already has a key"):
        keys.create("ann", "user")
    keys.revoke("ann")
    with pytest.raises(ValueError, match="no live key named 'ann'"):
        keys.revoke("ann")
    [record] = keys.records()
    assert (record.name, record.role, record.hint) == ("ann", "rater", key[:7])
    assert record.revoked is not None and not record.may("user")


def test_the_cli_prints_the_key_alone_on_stdout(redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    from rankloop.cli import app

    monkeypatch.setenv("RANKLOOP_REDIS_URL", redis_server.url)
    sync_redis_module.Redis.from_url(redis_server.url).delete(KEYS_KEY, LIVE_KEY)
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "sim", "--role", "rater"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("rk_")
    listed = runner.invoke(app, ["keys", "list"])
    assert "sim" in listed.stdout and "rater" in listed.stdout and key not in listed.stdout
    assert runner.invoke(app, ["keys", "revoke", "sim"]).exit_code == 0
    refused = runner.invoke(app, ["keys", "create", "bad name"])
    assert refused.exit_code == 1 and "use 1 to 64 letters" in refused.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_open_is_for_loopback_only(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    settings = load_settings(host=host)
    if loopback:
        check_exposure(settings)
    else:
        with pytest.raises(ExposedError, match="RANKLOOP_AUTH=keys"):
            check_exposure(settings)
        check_exposure(load_settings(host=host, auth="keys"))
        check_exposure(load_settings(host=host, auth_open_anywhere=True))


async def test_idempotency_keys_are_each_holders_own(app_client: httpx.AsyncClient, keys: KeyStore) -> None:
    ann, rita = keys.create("ann", "user"), keys.create("rita", "rater")
    first, second = await _ask(app_client, ann), await _ask(app_client, rita)
    assert (await _rank(app_client, ann, first, idempotency_key="k1")).status_code == 201
    # The same key from another holder is theirs: neither a conflict nor a view of ann's event.
    assert (await _rank(app_client, rita, second, idempotency_key="k1")).status_code == 201
    reused = await _rank(app_client, ann, first, idempotency_key="k1", ranking=[0, 1])
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"


async def test_keys_and_quotas_without_redis_are_a_503(unused_port: int) -> None:
    from starlette.requests import Request

    from api.errors import ApiError
    from deploy.auth import Auth
    from deploy.quota import Quotas

    away = Redis.from_url(f"redis://127.0.0.1:{unused_port}/0", socket_connect_timeout=1)
    request = Request({"type": "http", "headers": [(b"authorization", b"Bearer rk_x")], "app": None})
    with pytest.raises(ApiError) as keys:
        await Auth("keys", away).identify(request, "user")
    with pytest.raises(ApiError) as quotas:
        await Quotas(away, load_settings()).take(["key:ann"], {"chat": 1})
    for refused, what in ((keys.value, "API keys"), (quotas.value, "quotas")):
        assert (refused.status, refused.headers) == (503, {"Retry-After": "5"})
        assert refused.message.startswith(f"{what} cannot be checked")
    await away.aclose()
