"""The chat-and-rank page in Chromium: ask, K answers, rank by keyboard (with a tie and an undo) and by dragging,
write a better answer; what the page showed is what the dataset holds."""

from __future__ import annotations

import re
from pathlib import Path

import redis
from playwright.sync_api import Page, Route, expect

from deploy.redis_server import EmbeddedRedis
from feedback.comparisons import KEY_PREFIX
from tests.web.conftest import screenshot, stored


def ask(page: Page, url: str, text: str, k: int = 4) -> str:
    """Ask `text` for `k` answers; returns the comparison id once every answer is written and rankable."""
    page.goto(url)
    page.get_by_label("Answers to compare").fill(str(k))
    page.get_by_label("Your message").fill(text)
    page.keyboard.press("Enter")
    expect(page.locator("#rank-panel")).to_be_visible()
    expect(page.locator(".answer")).to_have_count(k)
    expect(page.locator(".answer.streaming")).to_have_count(0)
    comparison: str = page.evaluate("() => document.querySelector('#answers').dataset.comparison")
    return comparison


def press(page: Page, *keys: str) -> None:
    """Keys pressed on the ranking panel, one after the other."""
    page.locator("#rank-panel").focus()
    for key in keys:
        page.keyboard.press(key)


def test_keyboard_ranking_with_a_tie_is_stored_as_shown(
    page: Page, site: tuple[str, Path], redis_server: EmbeddedRedis
) -> None:
    url, data = site
    comparison = ask(page, url, "Name three rivers")
    expect(page.locator("#answer-0 .text")).to_contain_text("you said Name three rivers")
    expect(page.locator("#answer-0 .version")).to_have_text(" · v0001")  # web_show_versions is on here
    press(page, "2", "Backspace", "3", "1", "=", "4")  # 2 undone; C, then A tied with C, then D
    expect(page.locator("#ranking-shown")).to_have_text("Ranking: C = A > D")
    expect(page.locator("#ranked .rank-item")).to_have_count(3)
    expect(page.locator("#unranked .rank-item")).to_have_text([re.compile(r"^Answer B")])
    screenshot(page, "chat-ranking")
    page.keyboard.press("Enter")
    expect(page.locator("#ranking-result")).to_contain_text("Ranking submitted (event ")
    # The conversation goes on from the answer ranked best (C, the first of its tier).
    expect(page.locator("#conversation .turn.assistant")).to_contain_text("answer 2")

    rankings, _ = stored(redis_server.url, data / "feedback.sqlite3")
    mine = [r for r in rankings if r.comparison.id == comparison]
    assert [r.ranking for r in mine] == [[[2, 0], [3]]]

    # The next question is asked in the conversation that C's answer continued.
    with page.expect_request("**/v1/chat/completions") as asked:
        page.get_by_label("Your message").fill("And a fourth?")
        page.keyboard.press("Enter")
    assert [(m["role"], m["content"]) for m in asked.value.post_data_json["messages"]] == [
        ("user", "Name three rivers"),
        ("assistant", "answer 2: you said Name three rivers"),
        ("user", "And a fourth?"),
    ]


def test_retrying_a_submission_is_a_duplicate_not_a_second_ranking(
    page: Page, site: tuple[str, Path], redis_server: EmbeddedRedis
) -> None:
    url, data = site
    comparison = ask(page, url, "Say hello", k=2)
    sent: list[dict[str, object]] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/feedback") else None)
    # The first submission's reply is lost on the way back: the page keeps its idempotency key and retries.
    lost: list[Route] = []

    def lose_the_first_reply(route: Route) -> None:
        if lost:
            route.continue_()
            return
        lost.append(route)
        route.fetch()  # the server stores it ...
        route.abort()  # ... and the page never hears back

    page.route("**/v1/feedback", lose_the_first_reply)
    press(page, "2", "1")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Submitting the ranking failed")
    page.keyboard.press("1")  # a ranking sent once no longer changes: a retry is the same request
    expect(page.locator("#status")).to_contain_text("This ranking was sent once already")
    page.get_by_role("button", name="Submit ranking").click()
    expect(page.locator("#ranking-result")).to_contain_text("was submitted already (event ")
    assert len(sent) == 2 and sent[0] == sent[1]  # the same body, the same idempotency key
    assert sent[0]["ranking"] == [1, 0]
    rankings, _ = stored(redis_server.url, data / "feedback.sqlite3")
    assert [r.ranking for r in rankings if r.comparison.id == comparison] == [[[1], [0]]]


def test_drag_and_drop_ranking(page: Page, site: tuple[str, Path], redis_server: EmbeddedRedis) -> None:
    url, data = site
    comparison = ask(page, url, "Rank me by dragging", k=3)

    def drag(label: str, target: str) -> None:
        source = page.locator("#unranked .rank-item", has_text=label).bounding_box()
        box = page.locator(target).bounding_box()
        assert source is not None and box is not None
        page.mouse.move(source["x"] + 20, source["y"] + source["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + 30, box["y"] + box["height"] - 4, steps=12)
        page.mouse.up()

    drag("Answer C", "#ranked")
    expect(page.locator("#ranked .rank-item")).to_have_count(1)
    drag("Answer A", "#ranked")
    expect(page.locator("#ranking-shown")).to_have_text("Ranking: C > A")
    page.get_by_role("button", name="Submit ranking").click()
    expect(page.locator("#ranking-result")).to_contain_text("Ranking submitted")
    rankings, _ = stored(redis_server.url, data / "feedback.sqlite3")
    assert [r.ranking for r in rankings if r.comparison.id == comparison] == [[[2], [0]]]


def test_a_better_answer_is_stored_as_a_demonstration(
    page: Page, site: tuple[str, Path], redis_server: EmbeddedRedis
) -> None:
    url, data = site
    comparison = ask(page, url, "What is the capital of France?", k=2)
    page.get_by_text("Write a better answer").focus()
    page.keyboard.press("Enter")  # opens it: Enter on a control is the control's, not "submit the ranking"
    page.get_by_label("Your answer to the same message").fill("Paris.")
    page.get_by_role("button", name="Send your answer").click()
    expect(page.locator("#demo-result")).to_contain_text("Your answer was saved (event ")
    _, demonstrations = stored(redis_server.url, data / "feedback.sqlite3")
    mine = [d for d in demonstrations if d.comparison_id == comparison]
    assert [d.answer for d in mine] == ["Paris."]
    assert mine[0].messages[-1]["content"] == "What is the capital of France?"


def test_an_expired_comparison_is_said_so(page: Page, site: tuple[str, Path], redis_server: EmbeddedRedis) -> None:
    url, _ = site
    comparison = ask(page, url, "Asked long ago", k=2)
    client = redis.Redis.from_url(redis_server.url)
    client.delete(KEY_PREFIX + comparison)  # what its TTL does after RANKLOOP_COMPARISON_TTL_S
    client.close()
    press(page, "1", "2", "Enter")
    expect(page.locator("#status")).to_have_text(
        "This comparison has expired or is unknown to the server; ask again to get new answers."
    )
    expect(page.locator("#ranking-result")).to_have_text("")


LABELLED = """() => Array.from(document.querySelectorAll('input, textarea, select, button'))
    .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
    .map((el) => el.outerHTML)"""


def test_the_page_fits_a_phone_and_every_control_is_labelled(page: Page, site: tuple[str, Path]) -> None:
    url, _ = site
    page.set_viewport_size({"width": 375, "height": 800})
    ask(page, url, "A question asked on a phone, with a long answer to wrap")
    press(page, "1", "2")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    assert page.evaluate(LABELLED) == []
    screenshot(page, "chat-phone")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.url.endswith("/v1/feedback") else None)
    page.keyboard.press("Enter")
    page.keyboard.press("Enter")  # on its way or answered, the ranking is not sent twice
    expect(page.locator("#ranking-result")).to_contain_text("Ranking submitted")
    assert len(sent) == 1
    expect(page.locator("#conversation .turn.assistant")).to_have_count(1)
