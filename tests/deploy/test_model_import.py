import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.model_import import bundled_gguf, import_if_empty, import_model
from deploy.model_store import Card, ModelStore, StoreError
from tests.tiny import tiny_llama_folder

QUIET = Console(quiet=True)


def test_a_local_folder_becomes_v0001_current_and_reference(tmp_path: Path) -> None:
    source = tiny_llama_folder(tmp_path / "src")
    store = ModelStore(tmp_path / "store")
    assert import_model(store, source, QUIET) == "v0001"
    assert (store.current(), store.reference()) == ("v0001", "v0001")
    card = store.card("v0001")
    assert card.made_by == "import" and card.details == {"source": str(source), "roles": ["sft_reference"]}
    folder = store.path("v0001")
    # The weights round-trip exactly, and the tokenizer keeps its chat template.
    original = AutoModelForCausalLM.from_pretrained(source)
    imported = load_file(str(folder / "model.safetensors"))
    for name, tensor in original.state_dict().items():
        if name in imported:
            assert torch.equal(imported[name].to(tensor.dtype), tensor), name
    assert AutoTokenizer.from_pretrained(folder).chat_template


def test_a_second_import_is_v0002_and_leaves_the_pointers(tmp_path: Path) -> None:
    source = tiny_llama_folder(tmp_path / "src")
    store = ModelStore(tmp_path / "store")
    import_model(store, source, QUIET)
    assert import_model(store, source, QUIET) == "v0002"
    assert (store.current(), store.reference()) == ("v0001", "v0001")
    assert store.card("v0002").details["roles"] == []


def test_imports_if_empty_from_replicas_starting_together_write_one_version(tmp_path: Path) -> None:
    """Replica B's `--if-empty` import starts while replica A is importing into the empty store: B waits for A and
    finds A's version. Without the import lock B sees the store empty and writes a second one."""
    source = tiny_llama_folder(tmp_path / "src")
    store = ModelStore(tmp_path / "store")
    results: list[str | None] = []
    with store.importing():  # replica A, mid-import
        other = threading.Thread(target=lambda: results.append(import_if_empty(store, source, QUIET)))
        other.start()
        time.sleep(0.5)  # long enough for B to look at the store and start writing, were it not waiting
        assert store.is_empty() and other.is_alive()
        a = Card(version=store.next_version(), parent=None, made_by="import", details={})
        store.publish(a, lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True))
        store.set_current(a.version)
    other.join(timeout=60)
    assert results == [None] and store.versions() == ["v0001"]
    assert import_if_empty(ModelStore(tmp_path / "empty"), source, QUIET) == "v0001"


def test_a_model_without_chat_template_is_refused(tmp_path: Path) -> None:
    source = tiny_llama_folder(tmp_path / "src", with_chat_template=False)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match="no chat template"):
        import_model(store, source, QUIET)
    assert store.versions() == []


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"neither a \.gguf file nor a folder with config\.json"):
        import_model(ModelStore(tmp_path / "store"), tmp_path, QUIET)


def test_the_bundled_gguf_is_found_without_importing_its_package() -> None:
    path = bundled_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
