"""The canary in the registry on a real Redis server: start and stop with their events, the refusals that say what
to do, a rejected candidate that no promotion takes, and a change of the current version that ends the canary."""

from pathlib import Path

import pytest
from redis import Redis

from deploy.canary import Canaries, Canary
from deploy.model_store import ModelStore
from deploy.promotion import promote, rollback, sync_store
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry, RegistryError
from tests.tiny import publish_adapter_version, tiny_versions_store


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """v0001 current; v0002 and v0003 full-weight versions; v0004 and v0005 adapters on v0001."""
    store = tiny_versions_store(tmp_path)
    for version in ("v0004", "v0005"):
        publish_adapter_version(store, version)
    return store


def test_a_canary_starts_and_stops_with_its_events(sync_redis: Redis, store: ModelStore) -> None:
    registry, canaries = Registry(sync_redis), Canaries(sync_redis)
    sync_store(registry, store)
    started = canaries.start(store, "v0004", share=0.25, split=2, who="ann", why="try it")
    assert canaries.running() == started == Canary("v0004", "v0001", 0.25, 2, started.started, "ann")
    assert canaries.stop("bob", "enough") == "v0004"
    assert canaries.running() is None
    assert [(e.action, e.version, e.previous, e.who, e.why) for e in registry.events()[1:]] == [
        ("canary_start", "v0004", "v0001", "ann", "try it"),
        ("canary_stop", "v0004", "v0001", "bob", "stopped: enough"),
    ]
    assert registry.show("v0004").state == "ready"  # stopped, not judged


@pytest.mark.parametrize(
    ("version", "share", "split", "message"),
    [
        ("v0004", 0.0, 2, "--share 0.0: give the share of comparisons to mix, above 0 and at most 1"),
        ("v0004", 1.5, 2, "--share 1.5"),
        ("v0004", 0.25, 0, "--split 0: the candidate writes at least 1 answer"),
        ("v0002", 0.25, 2, "v0002 runs on v0002's weights and v0001 on v0001's: a server cannot answer with both"),
        ("v0001", 0.25, 2, "v0001 is the current version already"),
        ("v0009", 0.25, 2, "version v0009 is not registered"),
    ],
)
def test_refusals_say_what_to_do(
    sync_redis: Redis, store: ModelStore, version: str, share: float, split: int, message: str
) -> None:
    sync_store(Registry(sync_redis), store)
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        Canaries(sync_redis).start(store, version, share, split, "ann")
    assert Canaries(sync_redis).running() is None


def test_one_canary_at_a_time(sync_redis: Redis, store: ModelStore) -> None:
    sync_store(Registry(sync_redis), store)
    canaries = Canaries(sync_redis)
    with pytest.raises(RegistryError, match="no canary is running"):
        canaries.stop("ann")
    canaries.start(store, "v0004", 0.25, 2, "ann")
    with pytest.raises(RegistryError, match="a canary of v0004 is running: stop it first"):
        canaries.start(store, "v0005", 0.25, 2, "bob")
    with pytest.raises(RegistryError, match="the running canary is v0004, not v0005"):
        canaries.stop("bob", expected="v0005")
    assert canaries.running() is not None and canaries.running().version == "v0004"  # type: ignore[union-attr]


def test_a_rejected_candidate_is_never_promoted(sync_redis: Redis, store: ModelStore) -> None:
    registry, canaries = Registry(sync_redis), Canaries(sync_redis)
    sync_store(registry, store)
    canaries.start(store, "v0004", 0.25, 2, "learner")
    canaries.stop("learner", "upper bound 0.41", expected="v0004", rejected=True)
    assert registry.show("v0004").state == "rejected"
    with pytest.raises(RegistryError, match="version v0004 is rejected, not ready"):
        promote(registry, store, "v0004", "ann", "")
    with pytest.raises(RegistryError, match="v0004 is rejected, not ready: it cannot be a canary"):
        canaries.start(store, "v0004", 0.25, 2, "ann")


def test_a_change_of_the_current_version_ends_the_canary(sync_redis: Redis, store: ModelStore) -> None:
    registry, canaries = Registry(sync_redis), Canaries(sync_redis)
    sync_store(registry, store)
    canaries.start(store, "v0004", 0.25, 2, "ann")
    promote(registry, store, "v0004", "learner", "won its canary")
    assert canaries.running() is None
    actions = [(e.action, e.version, e.why) for e in registry.events()[2:]]
    assert actions == [("canary_stop", "v0004", "promoted"), ("promote", "v0004", "won its canary")]
    canaries.start(store, "v0005", 0.25, 2, "ann")  # against v0004 now
    rollback(registry, store, "bob", "users complain")
    assert canaries.running() is None
    assert registry.events()[-2].why == "ended: the current version changed"


def test_operator_commands(
    sync_redis: Redis, store: ModelStore, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import time

    from typer.testing import CliRunner

    from deploy.settings import load_settings
    from feedback.dataset import Dataset
    from rankloop.cli import app
    from tests.feedback.test_standings import CANDIDATE_FIRST, CURRENT_FIRST, ranking

    monkeypatch.setenv("RANKLOOP_DATA_DIR", str(store.root.parent))
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    refused = runner.invoke(app, ["canary", "start", "v0004"])
    assert refused.exit_code == 1 and "RANKLOOP_SERVE_ADAPTERS=true" in " ".join(refused.output.split())
    monkeypatch.setenv("RANKLOOP_SERVE_ADAPTERS", "true")
    started = runner.invoke(app, ["canary", "start", "v0002"])
    assert started.exit_code == 1 and "a server cannot answer with both" in " ".join(started.output.split())
    started = runner.invoke(app, ["canary", "start", "v0004", "--share", "0.5", "--split", "1"])
    assert started.exit_code == 0, started.output
    assert "canary v0004 against v0001: 50% of comparisons, 1 answer(s) each" in started.output
    assert "no ranking of a mixed comparison yet" in runner.invoke(app, ["canary", "status"]).output
    now = int(time.time() * 1000) + 1000
    rows = [ranking(n, now + n, CANDIDATE_FIRST if n % 4 else CURRENT_FIRST) for n in range(8)]
    with Dataset(load_settings().dataset_path) as dataset:
        dataset.insert([(i, k, d.replace('"v0002"', '"v0004"')) for i, k, d in rows])
    status = runner.invoke(app, ["canary", "status"])
    assert status.exit_code == 0 and "75.0%" in status.output and "32" in status.output, status.output
    board = json.loads(runner.invoke(app, ["leaderboard", "--json"]).output)
    assert (board["rankings"], board["pairs"], list(board["strengths"])) == (8, 32, ["v0004", "v0001"])
    assert board["against_current"][0]["rate"] == pytest.approx(0.75)
    stopped = runner.invoke(app, ["canary", "stop", "--reject", "--reason", "users prefer v0001"])
    assert stopped.exit_code == 0 and "canary v0004 stopped and rejected" in stopped.output
    assert Registry(sync_redis).show("v0004").state == "rejected"
    assert "no canary is running" in runner.invoke(app, ["canary", "status"]).output
