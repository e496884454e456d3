"""`RANKLOOP_LEARN_BUILD_ON=undecided` on a real Redis server: a version the gate refused for want of evidence alone
is what the next round trains further, while the version it was built on is still served; a promotion, a refusal
for cause, another served version, a version no longer `ready` or a third undecided version ends the chain, and a
chain's version that passes replaces the served one."""

from pathlib import Path

import pytest
from redis import Redis

from deploy.learner_status import read_status
from deploy.model_store import Card, ModelStore
from deploy.promotion import sync_store
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry
from deploy.settings import Settings, load_settings
from learn.daemon import Learner
from learn.policy_eval import Agreement
from learn.rounds import PPOResult
from tests.learn.test_gate import AGREES, agreeing, ev
from tests.tiny import tiny_versions_store

UNDECIDED = agreeing(0.6, 30)  # 95% low 42%: leaning towards users, not beyond chance


@pytest.fixture
def settings(tmp_path: Path, redis_server: EmbeddedRedis) -> Settings:
    """v0001 current, v0002 a trained copy of it."""
    tiny_versions_store(tmp_path)
    return load_settings(
        data_dir=tmp_path, redis_url=redis_server.url, learn_auto_promote=True, learn_build_on="undecided"
    )


def result(version: str, parent: str, replaces: str, agreement: Agreement, store: ModelStore) -> PPOResult:
    return PPOResult(version, parent, replaces, ev(0.1), ev(0.3, 2.1), agreement, 2.0, store.card(version), 0, {})


def test_the_next_round_builds_on_an_undecided_version_until_one_is_promoted(
    sync_redis: Redis, settings: Settings
) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    sync_store(registry, store)
    learner = Learner(settings, sync_redis)
    assert learner.start_from("v0001") == "v0001"  # nothing built yet

    assert learner._finish(result("v0002", "v0001", "v0001", UNDECIDED, store)) == "ready v0002"
    assert registry.current()[0] == "v0001"
    assert learner.start_from("v0001") == "v0002"
    status = read_status(sync_redis)
    assert status is not None and status["last_round"]["undecided"] is True
    assert status["detail"] == (
        "v0002 ready (it agrees with 60% of 30 held-out ranked pairs, not beyond chance (95% low 42%); "
        "the next round builds on it)"
    )
    # Users are served another version by now (an operator promoted it): the chain is not theirs to build on.
    assert learner.start_from("v0003") == "v0003"

    # The chain's next version passes against the served one: it replaces v0001, though its parent is v0002.
    store.publish(Card("v0004", "v0002", "ppo"), lambda f: copy(store.path("v0002"), f))
    sync_store(registry, store)
    assert learner._finish(result("v0004", "v0002", "v0001", AGREES, store)) == "promoted v0004"
    assert registry.current()[0] == "v0004"
    assert learner.start_from("v0004") == "v0004"


def test_a_refusal_for_cause_ends_the_chain(sync_redis: Redis, settings: Settings) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    sync_store(registry, store)
    learner = Learner(settings, sync_redis)
    learner._finish(result("v0002", "v0001", "v0001", UNDECIDED, store))
    assert learner.start_from("v0001") == "v0002"
    against = agreeing(0.45, 30)  # users' pairs lean against it: refused, and not built on
    assert learner._finish(result("v0002", "v0001", "v0001", against, store)) == "ready v0002"
    assert learner.start_from("v0001") == "v0001"


def test_a_chain_holds_at_most_three_undecided_versions_and_none_an_operator_rejected(
    sync_redis: Redis, settings: Settings
) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    for version, parent in (("v0004", "v0002"), ("v0005", "v0004")):
        store.publish(Card(version, parent, "ppo"), lambda f, p=parent: copy(store.path(p), f))
    sync_store(registry, store)
    learner = Learner(settings, sync_redis)
    assert learner._finish(result("v0002", "v0001", "v0001", UNDECIDED, store)) == "ready v0002"
    assert learner._finish(result("v0004", "v0002", "v0001", UNDECIDED, store)) == "ready v0004"
    assert learner.start_from("v0001") == "v0004"
    # The third undecided version on v0001: each judgement looked again at much the same held-out pairs.
    assert learner._finish(result("v0005", "v0004", "v0001", UNDECIDED, store)) == "ready v0005"
    assert learner.start_from("v0001") == "v0001"
    status = read_status(sync_redis)
    assert status is not None and status["detail"].endswith(
        "; 3 versions were built on v0001: the next round starts from it again)"
    )
    # The version the chain would build on is no longer `ready` (its folder failed a check, or a canary rejected
    # it): the next round starts from the served one.
    learner._finish(result("v0002", "v0001", "v0001", UNDECIDED, store))
    assert learner.start_from("v0001") == "v0002"
    registry.mark_failed("v0002", "its weights failed their check")
    assert learner.start_from("v0001") == "v0001"


def test_by_default_every_round_starts_from_the_served_version(sync_redis: Redis, settings: Settings) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    sync_store(registry, store)
    learner = Learner(settings.model_copy(update={"learn_build_on": "served"}), sync_redis)
    assert learner._finish(result("v0002", "v0001", "v0001", UNDECIDED, store)) == "ready v0002"
    assert learner.start_from("v0001") == "v0001"
    status = read_status(sync_redis)
    assert status is not None and not status["detail"].endswith("the next round builds on it)")


def copy(source: Path, target: Path) -> None:
    for file in source.iterdir():
        if file.name != "card.json":
            (target / file.name).write_bytes(file.read_bytes())
