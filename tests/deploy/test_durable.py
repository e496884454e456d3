import os
import time
from pathlib import Path

from deploy.durable import stale, write_text_atomic
from deploy.model_store import Card, ModelStore


def test_an_atomic_write_leaves_only_the_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "CURRENT"
    write_text_atomic(target, "v0001\n")
    write_text_atomic(target, "v0002\n")
    assert target.read_text() == "v0002\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["CURRENT"]


def test_stale_looks_at_the_newest_file_inside(tmp_path: Path) -> None:
    folder = tmp_path / ".tmp-v0002-abc"
    (folder / "sub").mkdir(parents=True)
    old = time.time() - 7200
    for path in (folder, folder / "sub"):
        os.utime(path, (old, old))
    assert stale(folder, 3600)
    (folder / "sub" / "model.safetensors").write_bytes(b"x")  # a writer still at work
    assert not stale(folder, 3600)
    assert stale(folder, 3600, now=time.time() + 3601)


def test_sweep_removes_what_dead_writers_left_and_nothing_else(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with store.new_version(Card(version="v0001", parent=None, made_by="import")) as folder:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            (folder / name).write_text("{}")
    dead, alive = tmp_path / ".tmp-v0002-dead", tmp_path / ".tmp-v0003-alive"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    old = time.time() - 7200
    for path in (dead, dead / "model.safetensors"):
        os.utime(path, (old, old))
    assert store.sweep() == [".tmp-v0002-dead"]
    assert not dead.exists() and alive.is_dir()
    assert store.versions() == ["v0001"]
