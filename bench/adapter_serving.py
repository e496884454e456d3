"""Versions served as LoRA adapters against merged weights: chat throughput, and swap latency by adapter switch
against full reload, idle and under load.

v0002 is v0001 with a random LoRA on every linear layer, stored as a round's version is (merged weights, and the
adapter on v0001): rank 16 (PPO's, one round) and rank 64 (the most `RANKLOOP_MAX_ADAPTER_RANK` lets a chain of
rounds compose before a version becomes a base of its own). The servers answer the same function either way:

- throughput: the MT-bench workload of bench/chat_throughput.py (80 first turns, n=4, max_tokens 64, temperature
  0.8, 8 clients) against `rankloop serve` with v0002 current, merged (RANKLOOP_SERVE_ADAPTERS=false) or as its
  adapter (true); rounds alternate the order;
- swaps: bench/swap_latency.py's measure (from `promote` returning to the first answer from the new version),
  v0001 <-> v0002, switched as an adapter and reloaded as merged weights, idle and under 8 clients.

    .venv/bin/python bench/adapter_serving.py [--rounds 2] [--swaps 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402

from bench.chat_throughput import ENGINE_ENV, MT_BENCH, Result, _load, prompts  # noqa: E402
from bench.common import bench_store  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from bench.swap_latency import PARTS, series, under_load  # noqa: E402
from deploy.launcher import stop_group, wait_healthy  # noqa: E402
from deploy.model_store import Card, ModelStore  # noqa: E402
from deploy.promotion import sync_store  # noqa: E402
from deploy.redis_server import EmbeddedRedis  # noqa: E402
from deploy.registry import Registry  # noqa: E402

PORT = 8112
RANKS = (16, 64)


def adapter_store(source: ModelStore, folder: Path, rank: int) -> ModelStore:
    """v0001, and v0002 = v0001 with a random rank-`rank` LoRA on every linear layer (merged, and as an adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from learn.adapters import from_peft
    from learn.weights import load_causal_lm, save_policy

    store = ModelStore(folder / "models")
    shutil.copytree(source.path("v0001"), store.root / "v0001")
    store.set_current("v0001")
    store.set_reference("v0001")
    model, tokenizer = load_causal_lm(store.path("v0001"))
    torch.manual_seed(rank)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)  # a round's size of change: answers stay fluent
    card = Card("v0002", "v0001", "ppo", details={"adapter": {"base": "v0001", "rank": rank}})
    save_policy(model, tokenizer, store, card, (from_peft(model), "v0001"))
    return store


@contextmanager
def server(store: ModelStore, redis_url: str, adapters: bool, current: str) -> Iterator[tuple[str, Registry]]:
    """`rankloop serve` on `store` with `current` promoted, serving adapters or not; yields its URL and registry."""
    registry = Registry(Redis.from_url(redis_url))
    registry.redis.flushdb()
    store.set_current(current)
    sync_store(registry, store)
    env = {
        **os.environ,
        **ENGINE_ENV,
        "RANKLOOP_DATA_DIR": str(store.root.parent),
        "RANKLOOP_PORT": str(PORT),
        "REDIS_URL": redis_url,
        "RANKLOOP_SERVE_ADAPTERS": str(adapters).lower(),
    }
    log = open(Path(tempfile.gettempdir()) / "bench-adapters.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "rankloop", "serve"], env=env, stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{PORT}"
    try:
        wait_healthy(url, process)
        yield url, registry
    finally:
        stop_group(process)
        registry.redis.close()


def throughput(store: ModelStore, redis_url: str, adapters: bool, name: str) -> Result:
    with server(store, redis_url, adapters, "v0002") as (url, _):
        asyncio.run(_load(url, "rankloop", prompts()[:8]))  # warm-up, as chat_throughput does
        result = asyncio.run(_load(url, "rankloop", prompts()))
    result.name = name
    print(f"{name}: {result.tok_s:.1f} tok/s, p95 {result.pct(0.95):.2f} s", flush=True)
    return result


Swaps = dict[str, list[dict[str, float]]]


def swaps(store: ModelStore, redis_url: str, adapters: bool, count: int) -> tuple[Swaps, int, int]:
    with server(store, redis_url, adapters, "v0001") as (url, registry):
        idle = series(url, registry, store, count)
        loaded, ok, failed = under_load(url, registry, store, count)
    return {"idle": idle, "under load": loaded}, ok, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="throughput passes of each configuration")
    parser.add_argument("--swaps", type=int, default=10, help="swaps of each kind, idle and under load")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    if not MT_BENCH.is_file():
        sys.exit(f"skipped: {MT_BENCH} is absent")
    source = bench_store(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    stores = {rank: adapter_store(source, work / f"rank{rank}", rank) for rank in RANKS}
    configs: list[tuple[str, Callable[[str], Result]]] = [
        ("merged weights", lambda url: throughput(stores[RANKS[0]], url, False, "merged weights")),
        *[
            (f"adapter, rank {r}", lambda url, r=r: throughput(stores[r], url, True, f"adapter, rank {r}"))
            for r in RANKS
        ],
    ]
    results: list[Result] = []
    with EmbeddedRedis(work / "redis", 6397) as redis_server:
        for round_ in range(args.rounds):
            shift = round_ % len(configs)  # a different configuration goes first each round
            for _, run in configs[shift:] + configs[:shift]:
                results.append(run(redis_server.url))
        switched = swaps(stores[RANKS[0]], redis_server.url, True, args.swaps)
        reloaded = swaps(stores[RANKS[0]], redis_server.url, False, args.swaps)
    shutil.rmtree(work, ignore_errors=True)
    write_section("adapter_serving", render(results, [name for name, _ in configs], switched, reloaded, args))


def render(
    results: list[Result],
    names: list[str],
    switched: tuple[Swaps, int, int],
    reloaded: tuple[Swaps, int, int],
    args: argparse.Namespace,
) -> str:
    def tok_s(name: str) -> float:
        return statistics.mean(r.tok_s for r in results if r.name == name)

    def p95(name: str) -> float:
        return statistics.mean(r.pct(0.95) for r in results if r.name == name)

    def each(name: str) -> str:
        return " / ".join(f"{r.tok_s:.1f}" for r in results if r.name == name)

    def swap_row(label: str, figures: list[dict[str, float]]) -> str:
        cells = [f"{statistics.median(r[k] for r in figures):.2f} / {max(r[k] for r in figures):.2f}" for k in PARTS]
        return f"| {label} | " + " | ".join(cells) + " |"

    merged = tok_s(names[0])
    lines = [
        "## Versions served as LoRA adapters (issue 20)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; vLLM 0.32.0 CPU, eager, bf16, SmolLM2-135M, "
        "prefix caching; with adapters, vLLM starts with `enable_lora`, `max_lora_rank` 64, `max_loras` 2.",
        f"- Command: `.venv/bin/python bench/adapter_serving.py --rounds {args.rounds} --swaps {args.swaps}`.",
        "- v0002: v0001 with a random LoRA on every linear layer (B ~ N(0, 0.01), alpha = rank), stored as a round's "
        "version is: merged weights, and the adapter on v0001. The servers answer the same function either way.",
        "- Throughput: 80 MT-bench first turns, n=4, max_tokens 64, temperature 0.8, 8 concurrent clients, one "
        f"warm-up of 8 requests per start; {args.rounds} pass(es) of each configuration, a different one first each "
        "round.",
        "",
        "| v0002 served as | completion tok/s (mean) | each pass | p95 latency (s) | ratio to merged |",
        "|---|---|---|---|---|",
        *[f"| {n} | {tok_s(n):.1f} | {each(n)} | {p95(n):.2f} | **{tok_s(n) / merged:.3f}x** |" for n in names],
        "",
        f"- Swaps: {args.swaps} idle, then {args.swaps} under load (8 clients, n=4, max_tokens 64, temperature 0.8), "
        "alternating v0001 and v0002 (rank 16). Total: from `promote` returning to the first answer (1 token) from "
        "the new version; the parts as in bench/swap_latency.py (load: the adapter's loading for a switch).",
        "",
        "| swaps (p50 / max, s) | " + " | ".join(PARTS) + " |",
        "|---|" + "---|" * len(PARTS),
    ]
    for label, (figures, _, _) in (("adapter switch", switched), ("full reload", reloaded)):
        lines += [swap_row(f"{label}, {when}", figures[when]) for when in ("idle", "under load")]
    lines += [
        "",
        f"Requests under load: adapter switches {switched[1]} answered, **{switched[2]} failed**; full reloads "
        f"{reloaded[1]} answered, **{reloaded[2]} failed**. Targets: throughput with adapters >= 0.9x merged; "
        "adapter swap idle <= 0.2 s, under load <= 0.5 s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
