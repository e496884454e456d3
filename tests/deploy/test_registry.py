"""The policy registry on a real Redis server: sync with the store, promote, races, rollback, refusals."""

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from deploy.model_store import ModelStore
from deploy.promotion import check_folder, promote, rollback, sync_store
from deploy.redis_server import EmbeddedRedis
from deploy.registry import Conflict, Registry, RegistryError
from tests.tiny import tiny_versions_store


@pytest.fixture
def registry(redis_server: EmbeddedRedis) -> Iterator[Registry]:
    client = Redis.from_url(redis_server.url)
    client.flushdb()
    yield Registry(client)
    client.close()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return tiny_versions_store(tmp_path)


def test_sync_registers_the_store_and_its_current_version(registry: Registry, store: ModelStore) -> None:
    assert sync_store(registry, store) == ["v0001", "v0002", "v0003"]
    assert sync_store(registry, store) == []  # idempotent
    assert registry.current() == ("v0001", 1)
    assert [(v.version, v.state, v.parent) for v in registry.versions()] == [
        ("v0001", "current", None),
        ("v0002", "ready", "v0001"),
        ("v0003", "ready", "v0001"),
    ]
    [event] = registry.events()
    assert (event.epoch, event.action, event.version, event.previous) == (1, "init", "v0001", None)


def test_servers_started_together_on_an_empty_registry_both_start(
    registry: Registry, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas both read "no current version"; the second one's first switch then conflicts, and used to stop
    its server at start-up."""
    sync_store(registry, store)  # the first replica: v0001 current at epoch 1
    monkeypatch.setattr(registry, "current", lambda: (None, 0))  # the second read before the first switched
    assert sync_store(registry, store) == []
    monkeypatch.undo()
    assert registry.current() == ("v0001", 1)
    assert len(registry.events()) == 1  # one start, not two


def test_a_card_figure_that_is_not_a_number_is_kept_as_null(registry: Registry) -> None:
    # A round judged on no held-out pairs has NaN agreement; JSON has no NaN and the admin API refuses one.
    card = {"agreement": {"agreement": float("nan"), "agreement_pairs": 0.0}, "eval": [float("inf"), 1.5]}
    assert registry.register("v0001", None, "import", 1.0, card)
    shown = registry.show("v0001").card
    assert shown == {"agreement": {"agreement": None, "agreement_pairs": 0.0}, "eval": [None, 1.5]}


def test_promote_then_rollback(registry: Registry, store: ModelStore) -> None:
    sync_store(registry, store)
    assert promote(registry, store, "v0002", "ann", "better on evals") == 2
    assert registry.current() == ("v0002", 2)
    assert registry.show("v0001").state == "retired" and registry.show("v0002").state == "current"
    assert rollback(registry, store, "bob", "users complain") == ("v0001", 3)
    assert registry.current() == ("v0001", 3)
    events = registry.events()
    assert [(e.action, e.version, e.previous, e.who, e.why) for e in events[1:]] == [
        ("promote", "v0002", "v0001", "ann", "better on evals"),
        ("rollback", "v0001", "v0002", "bob", "users complain"),
    ]
    assert registry.events(after=events[1].id) == events[2:]


def test_racing_promotes_one_wins_one_conflicts(registry: Registry, store: ModelStore) -> None:
    sync_store(registry, store)
    registry.register("v0009", "v0001", "sft", 0.0, {})  # a second ready target (the switch itself checks no folder)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def operator(target: str) -> None:
        barrier.wait()
        try:
            registry.switch(target, "v0001", "promote", target, "race")
            outcomes.append("won")
        except Conflict as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=operator, args=(v,)) for v in ("v0002", "v0009")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes)[-1] == "won" and "someone changed it first" in sorted(outcomes)[0]
    assert registry.current()[1] == 2 and len(registry.events()) == 2


def test_a_corrupt_folder_is_refused_and_marked_failed(registry: Registry, store: ModelStore) -> None:
    sync_store(registry, store)
    with pytest.raises(RegistryError, match="does not fit the served architecture"):
        promote(registry, store, "v0003", "ann", "oops")
    assert registry.current() == ("v0001", 1)
    failed = registry.show("v0003")
    assert failed.state == "failed" and "another shape" in (failed.error or "")
    with pytest.raises(RegistryError, match="v0003 is failed, not ready"):
        registry.switch("v0003", "v0001", "promote", "ann", "again")


def test_check_folder_names_what_is_missing(store: ModelStore, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(store.path("v0002"), broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RegistryError, match="not a readable model"):
        check_folder(broken, store.path("v0001"))
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(RegistryError, match=r"lacks tokenizer_config\.json"):
        check_folder(broken, None)


def test_refusals_say_why(registry: Registry, store: ModelStore) -> None:
    sync_store(registry, store)
    with pytest.raises(RegistryError, match="v0001 is already the current version"):
        promote(registry, store, "v0001", "ann", "")
    with pytest.raises(RegistryError, match="no version 'v0042'"):
        promote(registry, store, "v0042", "ann", "")
    with pytest.raises(RegistryError, match="has no previous version"):
        rollback(registry, store, "ann", "")


def test_operator_commands(
    registry: Registry, store: ModelStore, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from rankloop.cli import app

    monkeypatch.setenv("RANKLOOP_DATA_DIR", str(store.root.parent))
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    listed = runner.invoke(app, ["versions"])
    assert listed.exit_code == 0, listed.output
    assert "current v0001, epoch 1" in listed.output and "v0003" in listed.output
    promoted = runner.invoke(app, ["promote", "v0002", "--reason", "evals"])
    assert promoted.exit_code == 0 and "v0002 is current (epoch 2)" in promoted.output
    shown = runner.invoke(app, ["versions", "show", "v0002"])
    assert '"state": "current"' in shown.output and '"parent": "v0001"' in shown.output
    refused = runner.invoke(app, ["promote", "v0003"])
    assert refused.exit_code == 1 and "does not fit the served architecture" in " ".join(refused.output.split())
    back = runner.invoke(app, ["rollback", "--reason", "complaints"])
    assert back.exit_code == 0 and "v0001 is current again (epoch 3)" in back.output
    assert registry.events()[-1].why == "complaints"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    down = runner.invoke(app, ["versions"])
    assert down.exit_code == 1 and "is not reachable" in " ".join(down.output.split())


def test_promote_and_rollback_keep_the_current_version_and_its_epoch_in_the_store(
    registry: Registry, store: ModelStore
) -> None:
    sync_store(registry, store)
    assert (store.current(), store.current_epoch()) == ("v0001", 0)  # as imported
    promote(registry, store, "v0002", "ann", "evals")
    assert (store.current(), store.current_epoch()) == ("v0002", 2)
    rollback(registry, store, "bob", "complaints")
    assert (store.current(), store.current_epoch()) == ("v0001", 3)
    store.set_current("v0002", 2)  # a promotion that reaches the disk after a newer one: ignored
    assert (store.current(), store.current_epoch()) == ("v0001", 3)


def test_a_redis_restarted_empty_serves_the_promoted_version_again_not_v0001(
    registry: Registry, store: ModelStore
) -> None:
    sync_store(registry, store)
    promote(registry, store, "v0002", "ann", "evals")
    registry.redis.flushdb()  # a Redis without persistence, restarted
    sync_store(registry, store)
    assert registry.current() == ("v0002", 3)  # above every epoch a server may have seen (2), never back to 1
    assert registry.show("v0002").state == "current" and registry.show("v0001").state == "ready"
    [event] = registry.events()
    assert (event.action, event.version, event.epoch) == ("restore", "v0002", 3)
    assert store.current_epoch() == 3
    sync_store(registry, store)  # nothing behind any more: no second restore
    assert registry.current() == ("v0002", 3) and len(registry.events()) == 1


def test_a_registry_that_lost_its_last_writes_is_brought_forward(registry: Registry, store: ModelStore) -> None:
    sync_store(registry, store)
    promote(registry, store, "v0002", "ann", "evals")
    # Redis came back from a snapshot taken before the promotion: v0001 current at epoch 1.
    registry.redis.set("rankloop:registry:current", "v0001")
    registry.redis.set("rankloop:registry:epoch", 1)
    sync_store(registry, store)
    assert registry.current() == ("v0002", 3)
    assert registry.show("v0001").state == "retired"
    assert registry.events()[-1].previous == "v0001"


def test_a_redis_that_keeps_nothing_on_disk_is_named_at_start(tmp_path: Path, redis_binary: Path | None) -> None:
    from deploy.redis_server import persistence_warning
    from tests.conftest import free_port

    # Its own server: the shared server's settings stay.
    server = EmbeddedRedis(tmp_path / "redis", free_port(), executable=redis_binary)
    server.start()
    client = Redis.from_url(server.url)
    try:
        assert persistence_warning(client) is None  # as rankloop runs it: AOF on
        client.config_set("appendonly", "no")
        warning = persistence_warning(client)
        assert warning is not None and "keeps nothing on disk" in warning and "appendonly yes" in warning
        client.config_set("save", "3600 1")
        assert "since its last RDB snapshot" in (persistence_warning(client) or "")
    finally:
        client.close()
        server.kill()


def test_a_rollback_from_a_version_that_does_not_fit_takes_a_sound_target(
    registry: Registry, store: ModelStore
) -> None:
    sync_store(registry, store)
    registry.switch("v0003", "v0001", "promote", "ann", "skipping the check")  # a version of another shape
    # Checked against the reference's architecture, not the current one's: v0001 is not marked failed.
    assert rollback(registry, store, "bob", "it does not load") == ("v0001", 3)
    assert registry.show("v0001").state == "current"


def test_a_server_starting_on_a_failed_version_takes_the_last_sound_one(registry: Registry, store: ModelStore) -> None:
    from deploy.promotion import servable

    sync_store(registry, store)
    assert servable(registry, store) == ("v0001", 1, None)
    promote(registry, store, "v0002", "ann", "evals")
    registry.switch("v0003", "v0002", "promote", "ann", "skipping the check")
    version, epoch, why = servable(registry, store)
    assert (version, epoch) == ("v0002", 3)
    assert why is not None and why.startswith("v0003 is failed") and "serving v0002" in why
    assert registry.show("v0003").state == "failed"  # found unsound at start: marked so for everyone
    registry.mark_failed("v0002", "it crashed the engine")
    assert servable(registry, store)[0] == "v0001"  # the one before


def test_a_change_on_a_registry_behind_the_store_gets_an_epoch_above_the_stores(
    registry: Registry, store: ModelStore
) -> None:
    sync_store(registry, store)
    promote(registry, store, "v0002", "ann", "evals")  # epoch 2, in the store too
    registry.redis.set("rankloop:registry:epoch", 0)  # Redis back from a snapshot with an older counter
    # Servers have seen epoch 2: the rollback must not be epoch 1, which they would skip, nor be lost in the store.
    assert rollback(registry, store, "bob", "complaints") == ("v0001", 3)
    assert (store.current(), store.current_epoch()) == ("v0001", 3)
