"""How `rankloop up` shares the machine's cores between the server and the learner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.launcher import core_budget
from deploy.settings import load_settings


def test_on_a_cpu_the_engine_and_the_learner_get_half_the_cores_each(tmp_path: Path) -> None:
    budget = core_budget(load_settings(data_dir=tmp_path), [0, 1, 2, 3], gpu=False)
    assert budget.server == {"RANKLOOP_CPU_THREADS": "0,1"}
    assert budget.learner == {"RANKLOOP_LEARN_THREADS": "2", "RANKLOOP_LEARN_CPUS": "2,3"}
    odd = core_budget(load_settings(data_dir=tmp_path), [0, 1, 2], gpu=False)  # the server keeps the odd core
    assert (odd.server, odd.learner["RANKLOOP_LEARN_CPUS"]) == ({"RANKLOOP_CPU_THREADS": "0,1"}, "2")
    two = core_budget(load_settings(data_dir=tmp_path), [0, 1], gpu=False)
    assert (two.server, two.learner) == (
        {"RANKLOOP_CPU_THREADS": "0"},
        {"RANKLOOP_LEARN_THREADS": "1", "RANKLOOP_LEARN_CPUS": "1"},
    )


def test_no_split_where_the_engine_is_on_a_gpu_or_one_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # an operator's own would be left alone
    settings = load_settings(data_dir=tmp_path)
    gpu = core_budget(settings, [0, 1, 2, 3], gpu=True)
    assert (gpu.server, gpu.learner) == (
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"RANKLOOP_LEARN_THREADS": "2", "RANKLOOP_LEARN_GPU_MEMORY_FRACTION": "0.45"},
    )
    one = core_budget(settings, [0], gpu=False)
    assert (one.server, one.learner) == ({}, {"RANKLOOP_LEARN_THREADS": "1"})


def test_a_learner_on_the_engines_gpu_gets_what_the_engine_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    shared = core_budget(load_settings(data_dir=tmp_path, gpu_memory_utilization=0.6), [0, 1], gpu=True)
    assert shared.learner == {"RANKLOOP_LEARN_THREADS": "1", "RANKLOOP_LEARN_GPU_MEMORY_FRACTION": "0.35"}
    assert (
        core_budget(load_settings(data_dir=tmp_path), [0, 1], gpu=True).learner["RANKLOOP_LEARN_GPU_MEMORY_FRACTION"]
        == "0.45"
    )  # vLLM's default half, less the 5% margin
    for chosen in ({"learn_device": "cuda:1"}, {"learn_device": "cpu"}, {"learn_gpu_memory_fraction": 0.8}):
        budget = core_budget(load_settings(data_dir=tmp_path, **chosen), [0, 1], gpu=True)
        assert "RANKLOOP_LEARN_GPU_MEMORY_FRACTION" not in budget.learner, chosen
    # The engine on GPU 1 and the learner on GPU 0 (the default): each has its own; on GPU 1 both, a share.
    apart = core_budget(load_settings(data_dir=tmp_path, serve_gpus="1"), [0, 1], gpu=True)
    assert apart.server == {"CUDA_VISIBLE_DEVICES": "1"} and "RANKLOOP_LEARN_GPU_MEMORY_FRACTION" not in apart.learner
    both = core_budget(load_settings(data_dir=tmp_path, serve_gpus="1", learn_device="cuda:1"), [0, 1], gpu=True)
    assert both.learner["RANKLOOP_LEARN_GPU_MEMORY_FRACTION"] == "0.45"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert core_budget(load_settings(data_dir=tmp_path), [0, 1], gpu=True).server == {}
    assert (
        "RANKLOOP_LEARN_GPU_MEMORY_FRACTION" not in core_budget(load_settings(data_dir=tmp_path), [0, 1], False).learner
    )


def test_an_operators_choice_is_left_alone(tmp_path: Path) -> None:
    for chosen in ({"cpu_threads": "0-2"}, {"learn_cpus": "3"}, {"learn_threads": 4}):
        budget = core_budget(load_settings(data_dir=tmp_path, **chosen), [0, 1, 2, 3], gpu=False)
        assert budget.server == {}, chosen
        assert "RANKLOOP_LEARN_CPUS" not in budget.learner, chosen
    assert core_budget(load_settings(data_dir=tmp_path, learn_enabled=False), [0, 1], gpu=False).server == {}
    assert core_budget(load_settings(data_dir=tmp_path, engine="fake"), [0, 1], gpu=False).server == {}


def _training_process(tmp_path: Path, cpus: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import os, sys, typer\nfrom rankloop.console import training_settings_or_exit\n"
        "try:\n    training_settings_or_exit()\nexcept typer.Exit as exit:\n    sys.exit(exit.exit_code)\n"
        "print(sorted(os.sched_getaffinity(0)))"
    )
    env = {**os.environ, "RANKLOOP_DATA_DIR": str(tmp_path), "RANKLOOP_LEARN_CPUS": cpus}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_a_training_process_keeps_to_the_learners_cores(tmp_path: Path) -> None:
    first = min(os.sched_getaffinity(0))
    pinned = _training_process(tmp_path, str(first))
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.strip() == f"[{first}]"
    nowhere = _training_process(tmp_path, "4095")
    assert nowhere.returncode == 2
    assert "RANKLOOP_LEARN_CPUS=4095 names none of the cores" in nowhere.stderr
