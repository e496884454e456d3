"""The operator console in Chromium: a wrong token is refused on the page; a promotion made there reaches the chat
page's next answers; and with Redis stopped the chat page says so and nothing is recorded."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from playwright.sync_api import Page, expect

from deploy.learner_status import STATUS_KEY
from deploy.redis_server import EmbeddedRedis
from feedback.comparisons import KEY_PREFIX
from feedback.stream import STREAM_KEY
from tests.conftest import free_port
from tests.servers import server_process
from tests.tiny import tiny_versions_store
from tests.web.conftest import LIMITS, TOKEN, screenshot
from tests.web.test_chat_page import ask, press


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/console")
    page.get_by_label("Admin token or admin API key").fill(token)
    page.get_by_role("button", name="Open the console").click()


def test_a_wrong_token_is_refused_visibly(page: Page, site: tuple[str, Path]) -> None:
    url, _ = site
    sign_in(page, url, "not-the-token")
    expect(page.locator("#status")).to_have_text("Refused: wrong admin token")
    expect(page.locator("#console")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.getItem('rankloop.adminToken')") is None


def wait_serving(url: str, version: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/healthz").json().get("policy_version") != version:
        assert time.monotonic() < deadline, f"{url} never served {version}"
        time.sleep(0.2)


def learner_at_work(redis_url: str, data: Path) -> None:
    """What a learner in its second PPO iteration leaves: its status in Redis, its metrics log under runs/."""
    now = time.time()
    status = {"phase": "ppo", "detail": "iteration 2/6 from v0001 with r0001", "iteration": 2, "iterations": 6}
    last = {"version": "v0005", "outcome": "ready", "gate": "agrees with 52% of 120 held-out ranked pairs"}
    client = redis.Redis.from_url(redis_url)
    client.set(STATUS_KEY, json.dumps({**status, "updated": now, "last_round": last}))
    client.close()
    rows = [{"time": now - 60 * (6 - i), "reward": 0.25 * i, "kl_per_answer": 0.5 * i} for i in range(6)]
    (data / "runs").mkdir(exist_ok=True)
    (data / "runs" / "v0001-ppo-r0001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_promotion_from_the_console_reaches_the_chat_page(
    page: Page, site: tuple[str, Path], redis_server: EmbeddedRedis
) -> None:
    url, data = site
    learner_at_work(redis_server.url, data)
    sign_in(page, url, TOKEN)
    expect(page.locator("#current")).to_have_text("v0001")
    expect(page.locator("#signin")).to_be_hidden()
    expect(page.locator("#versions tbody tr")).to_have_count(4)
    # A trained version's figures, as its card holds them: the share the gate read, rewards, KL, shares.
    trained = page.locator("#versions tbody tr[data-version=v0004] td")
    expect(trained.nth(5)).to_have_text("60.0% of 300")
    expect(trained.nth(6)).to_have_text("0.50 → 1.25")
    expect(trained.nth(7)).to_have_text("3.0")
    expect(trained.nth(8)).to_have_text("0.0% / 5.0%")
    expect(page.locator("#feedback")).to_contain_text("stream length")
    expect(page.locator("#learner")).to_contain_text("iteration 2/6 from v0001 with r0001")
    expect(page.locator("#learner")).to_contain_text("v0005 ready")
    assert page.locator("#learner-progress").evaluate("p => [p.value, p.max]") == [2, 6]
    expect(page.locator("#charts svg")).to_have_count(2)  # PPO reward and KL; nothing else has data yet
    expect(page.locator("#charts figcaption").first).to_have_text("PPO mean reward (last: 1.25)")
    page.get_by_role("button", name="Promote v0002").click()
    expect(page.locator("#confirm-text")).to_contain_text("Promote v0002?")
    page.get_by_label("Reason (kept in the event log)").fill("tried it by hand")
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#status")).to_contain_text("v0002 is now current")
    expect(page.locator("#current")).to_have_text("v0002")
    expect(page.locator("#events tbody tr").first).to_contain_text("tried it by hand")
    screenshot(page, "console")

    wait_serving(url, "v0002")
    ask(page, url, "Who answers now?", k=2)
    expect(page.locator("#answer-0 .version")).to_have_text(" · v0002")
    expect(page.locator("#answer-0 .text")).to_contain_text("from v0002")


def test_a_rollback_from_the_console(page: Page, site: tuple[str, Path]) -> None:
    url, _ = site
    sign_in(page, url, TOKEN)
    expect(page.locator("#versions tbody tr")).to_have_count(4)
    before = page.locator("#current").inner_text()
    page.get_by_role("button", name="Roll back…").click()
    page.get_by_label("Roll back to").select_option("v0004")
    page.get_by_label("Reason (kept in the event log)").fill("back to a known one")
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#status")).to_contain_text("Rolled back: v0004 is now current")
    expect(page.locator("#events tbody tr").first).to_contain_text(f"rollbackv0004{before}")
    page.reload()  # the token is kept for this tab's session: no second sign-in
    expect(page.locator("#current")).to_have_text("v0004")


def test_escape_or_cancel_changes_nothing(page: Page, site: tuple[str, Path]) -> None:
    url, _ = site
    sign_in(page, url, TOKEN)
    expect(page.locator("#versions tbody tr")).to_have_count(4)
    first, second = [v for v in ("v0001", "v0002", "v0004") if v != page.locator("#current").inner_text()][:2]
    events = page.locator("#events tbody tr").count()
    page.get_by_role("button", name=f"Promote {first}").click()
    page.get_by_label("Reason (kept in the event log)").fill("this one")
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#current")).to_have_text(first)
    for close in ("Escape", "Cancel"):  # after a confirmed dialog, closing the next one must not confirm it
        page.get_by_role("button", name=f"Promote {second}").click()
        page.get_by_label("Reason (kept in the event log)").fill("no, wait")
        if close == "Escape":
            page.keyboard.press("Escape")
        else:
            page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#confirm")).to_be_hidden()
    page.reload()
    expect(page.locator("#current")).to_have_text(first)
    expect(page.locator("#events tbody tr")).to_have_count(events + 1)


def test_a_stale_promotion_says_someone_else_changed_it(page: Page, site: tuple[str, Path]) -> None:
    url, _ = site
    page.clock.install()  # the page's 5-second refresh waits: the page goes on showing what it read
    sign_in(page, url, TOKEN)
    expect(page.locator("#versions tbody tr")).to_have_count(4)
    shown = page.locator("#current").inner_text()
    other, target = [v for v in ("v0001", "v0002", "v0004") if v != shown][:2]
    answer = httpx.post(  # another operator, meanwhile
        f"{url}/admin/promote",
        json={"version": other, "who": "someone else", "expected": shown},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 200, answer.text
    page.get_by_role("button", name=f"Promote {target}").click()  # the page still thinks `shown` is current
    page.get_by_label("Reason (kept in the event log)").fill("late")
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#status")).to_contain_text("Someone else changed the current version meanwhile")
    expect(page.locator("#current")).to_have_text(other)  # and the page now shows who won


@pytest.fixture
def fragile(tmp_path: Path, redis_binary: Path | None) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", free_port(), executable=redis_binary)
    server.start()
    yield server
    server.stop()


def test_with_redis_stopped_the_page_says_so_and_nothing_is_recorded(
    page: Page, tmp_path: Path, fragile: EmbeddedRedis
) -> None:
    store = tiny_versions_store(tmp_path)
    with server_process(store.root.parent, fragile.url, "fake", **LIMITS) as url:
        comparison = ask(page, url, "Asked while Redis runs", k=2)
        press(page, "1", "2")
        fragile.stop()
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("Submitting the ranking failed")
        expect(page.locator("#status")).to_contain_text("the server cannot store anything right now")
        expect(page.locator("#status")).to_contain_text("Nothing was recorded")
        expect(page.locator("#ranking-result")).to_have_text("")

        page.get_by_label("Your message").fill("Asked while Redis is down")
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text("Asking failed")
        expect(page.locator("#round")).to_be_hidden()  # no answers offered that could not be ranked
        screenshot(page, "chat-redis-down")

        fragile.start()
        client = redis.Redis.from_url(fragile.url)
        try:
            assert client.exists(KEY_PREFIX + comparison) == 1  # what was stored before survived the restart ...
            assert client.xlen(STREAM_KEY) == 0  # ... and neither the ranking nor its comparison reached the stream
        finally:
            client.close()
        fragile.stop()
