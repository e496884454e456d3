"""The web pages in a real browser: Debian's Chromium driven by Playwright (pytest-playwright's fixtures), against
a real server process (fake engine, real Redis).

Playwright's own browser download cannot be reached everywhere; the tests use the system's Chromium and skip, saying
how to install it, where there is none."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from deploy.model_store import Card
from deploy.redis_server import EmbeddedRedis
from feedback.consumer import FeedbackConsumer
from feedback.dataset import Dataset
from feedback.events import DemonstrationEvent, RankingEvent
from tests.servers import REPO, server_process
from tests.tiny import tiny_versions_store

TOKEN = "web-console-admin-token-0123"
# A tiny model's context: room for the fake engine's answers, within the settings' checks.
LIMITS = {"max_model_len": 256, "max_tokens_limit": 128, "default_max_tokens": 64}
SCREENSHOTS = Path(os.environ.get("RANKLOOP_SCREENSHOTS", REPO / "var" / "screenshots"))


def chromium() -> str | None:
    for candidate in (os.environ.get("RANKLOOP_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    found = chromium()
    if found is None:
        pytest.skip(
            "no Chromium for the browser tests: `apt-get install chromium` (Debian, Ubuntu), or point "
            "RANKLOOP_CHROMIUM at a Chromium or Chrome binary"
        )
    return {**browser_type_launch_args, "executable_path": found}


# What a round writes in a version's card, as far as the console shows it; its gate read agreement since the
# reference (60%), not against its parent (50%) nor summed (70%).
TRAINED = {
    "eval": {"before": {"reward": 0.5}, "after": {"reward": 1.25, "kl": 3.0, "empty": 0.0, "degenerate": 0.05}},
    "agreement": {
        "agreement": 0.7,
        "agreement_pairs": 300.0,
        "agreement_per_token": 0.5,
        "agreement_reference": 0.6,
    },
    "agreement_by": "reference",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[tuple[str, Path]]:
    """A server (fake engine, the tiny versions v0001-v0003 and v0004, another copy of v0001; the admin API on) and
    its data folder."""
    root = tmp_path_factory.mktemp("site")
    fresh(redis_server.url)
    store = tiny_versions_store(root)
    store.publish(
        Card("v0004", "v0001", "sft", details=TRAINED),
        lambda f: shutil.copytree(store.path("v0002"), f, dirs_exist_ok=True),
    )
    settings = {"admin_token": TOKEN, "web_show_versions": "true", **LIMITS}
    with server_process(store.root.parent, redis_server.url, "fake", **settings) as url:
        yield url, store.root.parent


def fresh(redis_url: str) -> None:
    """Nothing left in the session's Redis by earlier tests: a registry there would name another current version."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


def stored(redis_url: str, dataset_path: Path) -> tuple[list[RankingEvent], list[DemonstrationEvent]]:
    """What the feedback stream holds, moved into the dataset as the learner would: rankings and demonstrations."""
    client = redis.Redis.from_url(redis_url)
    try:
        with Dataset(dataset_path) as dataset:
            FeedbackConsumer(client, dataset, "web-tests").drain()
            return [e for _, e in dataset.rankings()], [e for _, e in dataset.demonstrations()]
    finally:
        client.close()


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
