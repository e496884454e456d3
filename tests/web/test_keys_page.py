"""The chat page with `RANKLOOP_AUTH=keys`: it asks for an API key, keeps it for the tab's session, and the ranking
is stored under the key's owner."""

from __future__ import annotations

from pathlib import Path

import redis
from playwright.sync_api import Page, expect

from deploy.keys import KeyStore
from deploy.redis_server import EmbeddedRedis
from tests.servers import server_process
from tests.tiny import tiny_versions_store
from tests.web.conftest import LIMITS, fresh, stored
from tests.web.test_chat_page import ask, press


def test_with_api_keys_the_page_asks_for_one_and_ranks_as_its_owner(
    page: Page, tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    fresh(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    key = KeyStore(client).create("ada", "user")
    client.close()
    store = tiny_versions_store(tmp_path)
    with server_process(store.root.parent, redis_server.url, "fake", auth="keys", **LIMITS) as url:
        page.goto(url)
        page.get_by_label("Your message").fill("Who am I?")
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("Asking failed:")  # no key yet: 401, said on the page
        page.get_by_label("API key").fill(key)
        page.get_by_label("API key").press("Tab")
        comparison = ask(page, url, "Who am I?", k=2)
        press(page, "2", "1", "Enter")
        expect(page.locator("#ranking-result")).to_contain_text("Ranking submitted")
        page.reload()
        expect(page.get_by_label("API key")).to_have_value(key)  # kept for this tab's session
    rankings, _ = stored(redis_server.url, tmp_path / "feedback.sqlite3")
    assert [(r.user, r.ranking) for r in rankings if r.comparison.id == comparison] == [("ada", [[1], [0]])]
