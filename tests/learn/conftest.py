from __future__ import annotations

from pathlib import Path

import pytest

from deploy.model_import import import_model
from deploy.model_store import ModelStore
from tests.learn.served import ranked, server  # noqa: F401  (fixtures for the daemon's tests)
from tests.tiny import tiny_llama_folder


@pytest.fixture
def tiny_store(tmp_path: Path) -> ModelStore:
    """A model store whose v0001 (current and SFT reference) is the tiny random llama."""
    store = ModelStore(tmp_path / "data" / "models")
    import_model(store, tiny_llama_folder(tmp_path / "tiny-src"))
    return store
