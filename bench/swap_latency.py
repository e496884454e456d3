"""Hot-swap latency: from `promote` returning to the first answer from the new version, idle and under load.

A server on the real engine (SmolLM2-135M, CPU, eager) with v0001 and v0002 (a copy, so each swap loads the same
amount of weights). Each swap is split into drain (answers in flight finishing on the old weights), load (the
engine reloading the weights and clearing its cache) and the rest (noticing the event, resuming, and answering
the probe request). Under load, 8 clients keep asking (n=4, max_tokens 64, temperature 0.8); failed requests are
counted. The load step is compared with the physical floor: reading the same safetensors file and
`load_state_dict` into an HF model of the same architecture. Figures go to BENCHMARKS.md.

    .venv/bin/python bench/swap_latency.py [--swaps 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402

from bench.common import bench_store  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from deploy.launcher import stop_group, wait_healthy  # noqa: E402
from deploy.model_store import Card, ModelStore  # noqa: E402
from deploy.promotion import promote, sync_store  # noqa: E402
from deploy.redis_server import EmbeddedRedis  # noqa: E402
from deploy.registry import Registry  # noqa: E402

PROBE = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "n": 1}
LOAD = {
    "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}],
    "max_tokens": 64,
    "n": 4,
    "temperature": 0.8,
}


def one_swap(url: str, registry: Registry, store: ModelStore, target: str) -> dict[str, float]:
    promote(registry, store, target, "bench", "swap latency")
    returned, returned_wall = time.perf_counter(), time.time()
    while True:
        asked = time.perf_counter()
        body = httpx.post(f"{url}/v1/chat/completions", json=PROBE, timeout=120).json()
        if body["policy_version"] == target:
            answered = time.perf_counter()
            break
    total = answered - returned
    swap = httpx.get(f"{url}/healthz", timeout=5).json()["last_swap"]
    # The probe that got the new version was asked before the gate opened or after; count only what it waited
    # beyond the swap itself: its time after the load finished.
    notice = swap["started_at"] - returned_wall
    swap_done = notice + swap["check_s"] + swap["total_s"]
    answer = answered - returned - max(swap_done, asked - returned)
    return {
        "total": total,
        "notice": notice,
        "check": swap["check_s"],
        "drain": swap["drain_s"],
        "load": swap["load_s"],
        "answer": answer,
        "rest": total - notice - swap["check_s"] - swap["drain_s"] - swap["load_s"] - answer,
    }


def series(url: str, registry: Registry, store: ModelStore, swaps: int) -> list[dict[str, float]]:
    results = []
    for i in range(swaps):
        results.append(one_swap(url, registry, store, "v0002" if i % 2 == 0 else "v0001"))
        print(f"swap {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[-1].items()), flush=True)
    return results


def under_load(url: str, registry: Registry, store: ModelStore, swaps: int) -> tuple[list[dict[str, float]], int, int]:
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                try:
                    ok = http.post(f"{url}/v1/chat/completions", json=LOAD).status_code == 200
                except httpx.HTTPError:
                    ok = False
                counts["ok" if ok else "failed"] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    try:
        results = series(url, registry, store, swaps)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return results, counts["ok"], counts["failed"]


def bare_load(folder: Path, times: int = 5) -> float:
    """Median seconds to read the safetensors file and load_state_dict it into an HF model: the floor."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        state: dict[str, torch.Tensor] = {}
        for file in folder.glob("*.safetensors"):
            state.update(load_file(file))
        model.load_state_dict(state, strict=False)
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    parser.add_argument("--idle-only", action="store_true", help="Print the idle swaps; write nothing.")
    args = parser.parse_args()
    source = bench_store(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    store = ModelStore(work / "models")
    shutil.copytree(source.path("v0001"), work / "models" / "v0001")
    store.set_current("v0001")
    store.set_reference("v0001")

    def copy(folder: Path) -> None:
        for file in source.path("v0001").iterdir():
            if file.name != "card.json":
                shutil.copy(file, folder / file.name)

    store.publish(Card("v0002", "v0001", "copy"), copy)
    floor = bare_load(store.path("v0002"))
    with EmbeddedRedis(work / "redis", 6399) as redis_server:
        registry = Registry(Redis.from_url(redis_server.url))
        sync_store(registry, store)
        url = "http://127.0.0.1:8108"
        env = {**os.environ, "RANKLOOP_DATA_DIR": str(work), "RANKLOOP_PORT": "8108", "REDIS_URL": redis_server.url}
        log = open(Path(tempfile.gettempdir()) / "bench-swap.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "rankloop", "serve"], env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            wait_healthy(url, process)
            idle = series(url, registry, store, args.swaps)
            print(f"idle: p50 {statistics.median(r['total'] for r in idle):.2f} s", flush=True)
            if args.idle_only:
                return
            loaded, ok, failed = under_load(url, registry, store, args.swaps)
            print(f"under load: p50 {statistics.median(r['total'] for r in loaded):.2f} s; {failed} failed", flush=True)
        finally:
            stop_group(process)
    shutil.rmtree(work, ignore_errors=True)
    write_section("swap_latency", render(idle, loaded, ok, failed, floor, args.swaps))


PARTS = ("total", "notice", "check", "drain", "load", "answer", "rest")


def render(
    idle: list[dict[str, float]], loaded: list[dict[str, float]], ok: int, failed: int, floor: float, swaps: int
) -> str:
    def row(name: str, results: list[dict[str, float]]) -> str:
        cells = [f"{statistics.median(r[k] for r in results):.2f} / {max(r[k] for r in results):.2f}" for k in PARTS]
        return f"| {name} | " + " | ".join(cells) + " |"

    load_p50 = statistics.median(r["load"] for r in idle)
    return "\n".join(
        [
            "## Hot-swap latency (issue 5)",
            "",
            f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; vLLM 0.32.0 CPU, eager, SmolLM2-135M bf16.",
            f"- Command: `.venv/bin/python bench/swap_latency.py --swaps {swaps}`.",
            f"- {swaps} swaps idle, then {swaps} under load (8 clients, n=4, max_tokens 64, temperature 0.8), "
            "alternating v0001 and v0002 (a copy: every swap loads the same weights). Total: from `promote` returning "
            "to the first answer (1 token) from the new version. Split: notice (promote returning to the server "
            "taking the swap up), check (validating the folder; answers still flow), drain and load (as the server "
            "measured them), answer (the probe's time after the load finished: resuming and its own 1-token answer), "
            "rest (what none of those cover: the probe's HTTP round trips, clock differences).",
            "",
            "| swaps (p50 / max, s) | " + " | ".join(PARTS) + " |",
            "|---|" + "---|" * len(PARTS),
            row("idle", idle),
            row("under load", loaded),
            "",
            f"Requests under load: {ok} answered, **{failed} failed**. Bare `load_file` + `load_state_dict` of the "
            f"same safetensors into an HF model: {floor:.2f} s (median of 5): the engine's load step is "
            f"{load_p50 / floor:.1f}x that floor. Target: idle swap <= 1 s, 0 failed requests.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
