"""One device rule for every stage (RANKLOOP_LEARN_DEVICE): what is accepted, what a machine without the device
answers, and what an operator reads when a round runs out of GPU memory. The rule at work on a GPU is in
tests/learn/test_devices.py (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deploy.settings import SettingsError, load_settings
from learn.daemon import compute, failure
from learn.device import DeviceError, cap_memory, device_of, learn_device
from learn.ppo import Rollouts, pack

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:1"])
def test_the_setting_takes_a_device(tmp_path: Path, value: str) -> None:
    assert load_settings(data_dir=tmp_path, learn_device=value).learn_device == value


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "mps", " cpu", ""])
def test_the_setting_refuses_what_names_no_device(tmp_path: Path, value: str) -> None:
    with pytest.raises(SettingsError, match=r"learn_device: .*use auto, cpu, cuda or cuda:N"):
        load_settings(data_dir=tmp_path, learn_device=value)


@no_cuda
def test_a_machine_without_a_gpu_learns_on_its_cpu_and_refuses_cuda() -> None:
    assert learn_device("auto") == torch.device("cpu") == learn_device("cpu")
    with pytest.raises(DeviceError, match="RANKLOOP_LEARN_DEVICE=cuda:1: PyTorch sees no CUDA GPU"):
        learn_device("cuda:1")


@no_cuda
def test_the_rounds_are_told_their_device_and_precision(tmp_path: Path) -> None:
    assert compute(load_settings(data_dir=tmp_path, learn_device="auto", learn_bf16=False)) == ("cpu", False)
    assert compute(load_settings(data_dir=tmp_path, learn_device="cpu", learn_bf16=True)) == ("cpu", True)
    with pytest.raises(DeviceError):
        compute(load_settings(data_dir=tmp_path, learn_device="cuda"))


def test_a_batch_moves_whole_and_keeps_its_frames() -> None:
    packed = pack(Rollouts([[1, 2, 3, 4, 5], [6]], [[7, 8], [9, 10, 11]], [False, True]), 0, side="left")
    moved = packed.to(torch.device("meta"))  # a device other than the CPU that every machine has
    for name, tensor in vars(moved).items():
        assert tensor.device.type == "meta" and tensor.shape == getattr(packed, name).shape, name
    assert moved.width == packed.width == 7


def test_a_memory_cap_is_for_gpus_only() -> None:
    assert not cap_memory(torch.device("cpu"), 0.3)
    assert not cap_memory(torch.device("cuda", 0), None)  # unset: no cap, and no GPU touched


def test_the_model_says_where_its_inputs_go() -> None:
    assert device_of(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")


def test_an_operator_reads_what_to_change_when_the_gpu_runs_out_of_memory(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, learn_device="cuda:1")
    said = failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), settings)
    assert said.startswith("the round ran out of GPU memory on cuda:1 (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "the server keeps serving" in said and "RANKLOOP_LEARN_PROMPTS_PER_ITERATION" in said
    assert failure(ValueError("bad data"), settings) == "ValueError: bad data"
