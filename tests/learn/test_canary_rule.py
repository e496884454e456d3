"""`RANKLOOP_PROMOTE_ON=canary` on a real Redis server: a version that passed the gate goes to a canary instead of
being promoted, users who prefer it get it promoted, users who prefer the current version get it rejected, and
nothing is decided before enough pairs."""

import time
from pathlib import Path

import pytest
from redis import Redis

from deploy.canary import NO_ADAPTERS, Canaries
from deploy.model_store import ModelStore
from deploy.promotion import sync_store
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Registry
from deploy.settings import Settings, load_settings
from feedback.dataset import Dataset
from learn import canary_rule
from learn.daemon import Learner
from learn.rounds import PPOResult
from tests.feedback.test_standings import CANDIDATE_FIRST, CURRENT_FIRST, ranking
from tests.learn.test_gate import AGREES, ev
from tests.tiny import publish_adapter_version, tiny_versions_store


@pytest.fixture
def settings(tmp_path: Path, redis_server: EmbeddedRedis) -> Settings:
    """v0001 current; v0002 full weights; v0004 an adapter on v0001."""
    store = tiny_versions_store(tmp_path)
    publish_adapter_version(store, "v0004")
    return load_settings(
        data_dir=tmp_path,
        redis_url=redis_server.url,
        promote_on="canary",
        canary_min_pairs=32,
        canary_split=2,
        serve_adapters=True,
    )


LAST_ID = [0]  # the newest event id's milliseconds: each call's rankings come after the last call's


def rank(settings: Settings, candidate_first: int, current_first: int) -> None:
    """Rankings of mixed comparisons (v0004 wrote 2 of 4 answers: 4 pairs each), accepted from now on."""
    start = max(int(time.time() * 1000) + 1000, LAST_ID[0] + 1)
    tiers = [CANDIDATE_FIRST] * candidate_first + [CURRENT_FIRST] * current_first
    rows = [ranking(start + n, start + n, t) for n, t in enumerate(tiers)]
    LAST_ID[0] = start + len(tiers)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert([(i, k, d.replace('"v0002"', '"v0004"')) for i, k, d in rows])


def test_users_who_prefer_the_candidate_get_it_promoted(sync_redis: Redis, settings: Settings) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    sync_store(registry, store)
    assert canary_rule.begin(settings, registry, store, "v0004", "agrees") is None
    rank(settings, candidate_first=6, current_first=1)  # 28 pairs: fewer than 32, nothing decided
    assert canary_rule.judge(settings, registry, store) is None
    rank(settings, candidate_first=1, current_first=0)
    # 8 rankings, 7 won: mean 0.875, sd 0.353553, low end 0.875 - 1.959964 * 0.353553 / sqrt(8) = 0.630 > 0.5
    assert canary_rule.judge(settings, registry, store) == "promoted v0004"
    assert registry.current()[0] == "v0004" and Canaries(sync_redis).running() is None
    assert registry.events()[-1].why.startswith("won its canary: win rate 87.5% (95% 63.0%-100.0%) over 32 pairs")


def test_users_who_prefer_the_current_version_get_the_candidate_rejected(sync_redis: Redis, settings: Settings) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    sync_store(registry, store)
    canary_rule.begin(settings, registry, store, "v0004", "agrees")
    rank(settings, candidate_first=1, current_first=7)
    assert canary_rule.judge(settings, registry, store) == "rejected v0004"
    assert registry.current()[0] == "v0001" and registry.show("v0004").state == "rejected"
    assert Canaries(sync_redis).running() is None


def result_for(version: str, store: ModelStore, parent: str = "v0001") -> PPOResult:
    """A round's result that passes the gate, as if the round had made `version` from `parent`."""
    card = store.card(version)
    return PPOResult(version, parent, parent, ev(0.1), ev(0.3, 2.1), AGREES, 2.0, card, 0, {})


def test_the_learner_sends_a_version_that_passed_the_gate_to_a_canary(sync_redis: Redis, settings: Settings) -> None:
    store = ModelStore(settings.store_dir)
    learner = Learner(settings.model_copy(update={"learn_auto_promote": True}), sync_redis)
    sync_store(learner.registry, store)
    assert learner._finish(result_for("v0004", store)) == "canary v0004"
    assert learner.registry.current()[0] == "v0001"  # not promoted: users decide
    # Another version that passes while users judge this one waits, ready: the gate must not cut the canary short.
    assert learner._finish(result_for("v0003", store)) == "ready v0003"
    assert learner.registry.current()[0] == "v0001" and Canaries(sync_redis).running() is not None
    canary = Canaries(sync_redis).running()
    assert canary is not None and (canary.version, canary.share, canary.split) == ("v0004", 0.25, 2)
    rank(settings, candidate_first=8, current_first=0)
    learner.tick()
    assert learner.registry.current()[0] == "v0004"
    # A version on other weights than the current's cannot be a canary: the gate alone promotes it, as it says.
    assert learner._finish(result_for("v0002", store, parent="v0004")) == "promoted v0002"
    # Nor can any where servers answer with one version at a time.
    alone = Learner(settings.model_copy(update={"learn_auto_promote": False, "serve_adapters": False}), sync_redis)
    assert alone._finish(result_for("v0003", store, parent="v0002")) == "ready v0003"  # (sync: still ready)
    assert canary_rule.begin(alone.settings, alone.registry, store, "v0004", "") == NO_ADAPTERS


def test_a_canary_users_cannot_tell_apart_ends_undecided(sync_redis: Redis, settings: Settings) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    sync_store(registry, store)
    canary_rule.begin(settings, registry, store, "v0004", "agrees")
    close = settings.model_copy(update={"canary_max_pairs": 64})
    rank(settings, candidate_first=8, current_first=8)  # 64 pairs, rate 0.5
    assert canary_rule.judge(close, registry, store) == "undecided v0004"
    assert Canaries(sync_redis).running() is None and registry.show("v0004").state == "ready"


def test_a_verdict_that_cannot_be_carried_out_ends_the_canary(sync_redis: Redis, settings: Settings) -> None:
    registry, store = Registry(sync_redis), ModelStore(settings.store_dir)
    sync_store(registry, store)
    canary_rule.begin(settings, registry, store, "v0004", "agrees")
    rank(settings, candidate_first=8, current_first=0)
    (store.path("v0004") / "config.json").unlink()  # its folder no longer passes the check
    decided = canary_rule.judge(settings, registry, store)
    assert decided is not None and decided.startswith("abandoned v0004: ")
    assert Canaries(sync_redis).running() is None and registry.current()[0] == "v0001"
    assert registry.show("v0004").state == "failed"
