"""What the benchmarks share: the model store they run on, the device they train on, and TRL's environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.model_store import ModelStore  # noqa: E402


def bench_store(data_dir: Path, source: Path | None = None) -> ModelStore:
    """The benchmarks' model store (the tests' too: var/test-data), with v0001 imported on first use (~40 s) from
    `source` (a GGUF file or a model folder; default: the bundled SmolLM2)."""
    store = ModelStore(data_dir / "models")
    if store.current() is None:
        from deploy.model_import import import_model

        import_model(store, source)
    return store


@dataclass(frozen=True)
class Device:
    """Where a training benchmark runs, and the settings that follow from it, the same for both sides."""

    name: str  # "cpu" or "cuda"

    @property
    def gpu(self) -> bool:
        return self.name == "cuda"

    @property
    def checkpoint_activations(self) -> bool:
        return not self.gpu  # long dialogues outgrow a small machine's memory; a GPU's holds them

    @property
    def checkpoint_every(self) -> int:
        return 0 if self.gpu else 5  # hours on a CPU are worth resuming; minutes on a GPU are not worth the writes

    def prepare(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        if self.gpu:
            torch.set_float32_matmul_precision("high")  # TF32 products; TRL's side does the same

    def describe(self) -> str:
        return "TF32 products, no gradient checkpointing" if self.gpu else "gradient checkpointing"

    def trl_args(self) -> list[str]:
        return ["--device", self.name]


def run_in_trl_env(script: str, *args: str) -> dict[str, Any]:
    """Run bench/<script> with TRL's environment (made by bench/trl_env.sh, or the interpreter `TRL_PYTHON` names
    where one with TRL exists already); return the JSON line it prints last."""
    python = os.environ.get("TRL_PYTHON")
    if not python:
        made = subprocess.run(["bash", str(REPO / "bench/trl_env.sh")], capture_output=True, text=True, check=True)
        python = made.stdout.strip()
    argv = [python, str(REPO / "bench" / script), *args]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
