from pathlib import Path

import pytest

from deploy.model_store import Card, ModelStore, StoreError


def _fill(folder: Path) -> None:
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")


def test_versions_are_numbered_and_published_whole(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.is_empty() and store.next_version() == "v0001"
    store.publish(Card("v0001", None, "import"), _fill)
    store.publish(Card("v0002", "v0001", "ppo"), _fill)
    assert store.versions() == ["v0001", "v0002"]
    assert store.next_version() == "v0003"
    assert store.card("v0002").parent == "v0001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0001", "v0002"]  # no temporary folder left


def test_a_failed_write_leaves_no_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)

    def broken(folder: Path) -> None:
        _fill(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.publish(Card("v0001", None, "import"), broken)
    assert store.versions() == [] and list(tmp_path.iterdir()) == []


def test_an_incomplete_folder_is_not_published(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match=r"tokenizer_config\.json"):
        store.publish(Card("v0001", None, "import"), lambda f: (f / "config.json").write_text("{}"))
    assert store.versions() == []


def test_pointers_name_existing_versions_only(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.publish(Card("v0001", None, "import"), _fill)
    store.set_current("v0001")
    store.set_reference("v0001")
    assert (store.current(), store.reference()) == ("v0001", "v0001")
    with pytest.raises(StoreError, match="no version 'v0007'"):
        store.set_current("v0007")
    assert store.current() == "v0001"
