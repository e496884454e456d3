"""What the benchmarks share: the model store they run on, and TRL's separate environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.model_store import ModelStore  # noqa: E402


def bench_store(data_dir: Path) -> ModelStore:
    """The benchmarks' model store (the tests' too: var/test-data), with v0001 imported on first use (~40 s)."""
    store = ModelStore(data_dir / "models")
    if store.current() is None:
        from deploy.model_import import import_model

        import_model(store)
    return store


def run_in_trl_env(script: str, *args: str) -> dict[str, Any]:
    """Run bench/<script> with TRL's environment (made by bench/trl_env.sh); return the JSON line it prints last."""
    made = subprocess.run(["bash", str(REPO / "bench/trl_env.sh")], capture_output=True, text=True, check=True)
    argv = [made.stdout.strip(), str(REPO / "bench" / script), *args]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
