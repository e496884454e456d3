"""Run the processes of the single-machine stack as children and stop each one's whole process tree.

vLLM's engine and worker processes can outlive a parent that was sent SIGTERM, so every child gets a
session of its own and is stopped as a process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from deploy.redis_server import _die_with_parent
from deploy.settings import Settings, cpu_list


@dataclass(frozen=True)
class CoreBudget:
    """Environment overrides `rankloop up` gives the server and the learner."""

    server: dict[str, str]
    learner: dict[str, str]


# Of one GPU shared by the engine and the learner, what neither takes: CUDA's own context and the allocators' slack.
GPU_MEMORY_MARGIN = 0.05


def core_budget(settings: Settings, cores: list[int], gpu: bool) -> CoreBudget:
    """How the stack shares this machine's cores (and GPU) when nothing is set: the learner gets half of the cores.

    With the engine on the CPU, the engine's OpenMP threads take the first half and the learner is pinned to the
    other half, one thread per core: two thread pools spread over the same cores spin and wait on each other's
    preempted threads, and both run several times slower than on half the cores each.

    With the engine on a GPU, it sees the GPUs of `serve_gpus` alone. A learner on one of them (GPU 0 is both
    defaults) may allocate what the engine's `gpu_memory_utilization` leaves, less a margin: a learner that took the
    engine's share would make vLLM fail its next allocation, and with it the server.
    """
    server: dict[str, str] = {}
    learner: dict[str, str] = {}
    if gpu and settings.engine == "vllm" and "CUDA_VISIBLE_DEVICES" not in os.environ:  # an operator's own wins
        server["CUDA_VISIBLE_DEVICES"] = settings.serve_gpus
    learner_gpu = 0 if settings.learn_device in ("auto", "cuda") else int(settings.learn_device.partition(":")[2] or -1)
    same_gpu = learner_gpu in cpu_list(settings.serve_gpus)
    if gpu and settings.learn_enabled and same_gpu and settings.learn_gpu_memory_fraction is None:
        left = max(GPU_MEMORY_MARGIN, 1.0 - settings.gpu_memory_utilization - GPU_MEMORY_MARGIN)
        learner["RANKLOOP_LEARN_GPU_MEMORY_FRACTION"] = f"{left:.2f}"
    if settings.learn_threads is None:
        learner["RANKLOOP_LEARN_THREADS"] = str(max(1, len(cores) // 2))
    shared_cpu = not gpu and settings.engine == "vllm" and settings.learn_enabled
    unset = settings.cpu_threads == "all" and settings.learn_cpus is None and settings.learn_threads is None
    if shared_cpu and unset and len(cores) >= 2:
        split = len(cores) - len(cores) // 2
        server["RANKLOOP_CPU_THREADS"] = ",".join(map(str, cores[:split]))
        learner["RANKLOOP_LEARN_CPUS"] = ",".join(map(str, cores[split:]))
    return CoreBudget(server, learner)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


def _start_session_and_die_with_parent() -> None:
    os.setsid()
    _die_with_parent()


class Launcher:
    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        process = subprocess.Popen(argv, env=env, preexec_fn=_start_session_and_die_with_parent)
        child = Child(name, process)
        self.children.append(child)
        return child

    def rankloop(self, name: str, *args: str, env: dict[str, str] | None = None) -> Child:
        return self.start(name, [sys.executable, "-m", "rankloop", *args], env)

    def wait_any(self) -> Child:
        """Block until one child exits; return it."""
        while True:
            for child in self.children:
                if child.process.poll() is not None:
                    return child
            time.sleep(0.5)

    def stop_all(self, grace_s: float = 20.0) -> None:
        for child in reversed(self.children):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(child.process, signal.SIGKILL)  # the group may hold engine processes still
            child.process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM a child's process group, then SIGKILL what is left after the grace period."""
    _signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    _signal_group(process, signal.SIGKILL)  # the engine core may outlive its parent
    process.wait()


def wait_healthy(url: str, process: subprocess.Popen[bytes], path: str = "/healthz", timeout_s: float = 600) -> float:
    """Seconds until `url + path` answers 200; raises if the process exits first or time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)
