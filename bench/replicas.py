"""Rankings/s and chats/s through nginx in front of 1, 2 and 3 serving replicas on this machine, beside one replica
reached directly (what the balancer costs).

The replicas are `rankloop serve` processes with the fake engine (generation is not measured) on one Redis (the
embedded one, AOF on) and one data folder; nginx runs with the proxying of deploy/docker/nginx.conf (Debian's
nginx: `apt-get install nginx`), the load comes from `wrk` (`apt-get install wrk`): rankings as in
bench/feedback_ingest.py (every request a new ranking of a seeded comparison), chats of 2 answers of 16 tokens. The
consumer runs throughout; afterwards the dataset's count is compared with the rankings the replicas accepted.

    .venv/bin/python bench/replicas.py [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import bench_store  # noqa: E402
from bench.feedback_ingest import WrkResult, accepted_rankings, drain, seed, wrk  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from deploy.launcher import stop_group, wait_healthy  # noqa: E402
from deploy.redis_server import EmbeddedRedis  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.servers import balancer, nginx_executable, start_server  # noqa: E402

REPLICAS = (1, 2, 3)


@contextmanager
def replicas(count: int, data: Path, redis_url: str) -> Iterator[list[str]]:
    """`count` servers on one data folder and Redis; yields their URLs (their accepted rankings are read before
    they stop, by the caller)."""
    ports = [free_port() for _ in range(count)]
    settings = {"max_rankings_per_comparison": 0}  # ~20k rankings a run over 1000 comparisons: far past the cap
    processes = [start_server(data, redis_url, "fake", port, **settings) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, process in zip(urls, processes, strict=True):
            wait_healthy(url, process, timeout_s=120)
        yield urls
    finally:
        for process in processes:
            stop_group(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    nginx = nginx_executable()
    if shutil.which("wrk") is None or nginx is None:
        sys.exit("this benchmark needs wrk and nginx: apt-get install wrk nginx")
    bench_store(args.data_dir)  # the fake engine still needs v0001's tokenizer
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    rows: list[tuple[str, WrkResult, WrkResult]] = []
    accepted = 0
    with EmbeddedRedis(work / "redis", free_port()) as redis_server:
        prefix = f"chatcmpl-replicas{int(time.time())}"
        asyncio.run(seed(redis_server.url, prefix))
        env = {**os.environ, "RANKLOOP_DATA_DIR": str(work), "REDIS_URL": redis_server.url}
        quiet = subprocess.DEVNULL
        consume = [sys.executable, "-m", "rankloop", "feedback", "consume"]
        consumer = subprocess.Popen(consume, env=env, stdout=quiet, stderr=quiet, start_new_session=True)
        try:
            for count in REPLICAS:
                with ExitStack() as stack:
                    urls = stack.enter_context(replicas(count, args.data_dir, redis_server.url))
                    targets = [(f"{count} behind nginx", None)]
                    if count == 1:
                        targets.insert(0, ("1, direct", urls[0]))
                    for name, direct in targets:
                        url = direct
                        if url is None:
                            ports = [int(u.rsplit(":", 1)[1]) for u in urls]
                            url = stack.enter_context(balancer(nginx, ports, work / f"nginx-{count}"))
                        ranked = wrk(f"{name}: rankings", url, args.seconds, args.connections, prefix)
                        chats = wrk(f"{name}: chats", url, args.seconds, args.connections, prefix, "chat.lua")
                        rows.append((name, ranked, chats))
                    accepted += sum(accepted_rankings(u) for u in urls)
        finally:
            stop_group(consumer)
        stored = drain(redis_server.url, work / "feedback.sqlite3")
    print(f"accepted {accepted}, in the dataset {stored}")
    write_section("replicas", render(rows, accepted, stored, args))
    shutil.rmtree(work, ignore_errors=True)


def render(rows: list[tuple[str, WrkResult, WrkResult]], accepted: int, stored: int, args: argparse.Namespace) -> str:
    base_rankings, base_chats = rows[0][1].rps, rows[0][2].rps
    lines = [
        "## Replicas behind a balancer (issue 22)",
        "",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}.",
        "",
        f"Command: `.venv/bin/python bench/replicas.py --seconds {args.seconds} --connections {args.connections}`",
        "",
        "- Replicas: `rankloop serve` with the fake engine, one Redis (embedded, AOF), one data folder; nginx with "
        "deploy/docker/nginx.conf's proxying; wrk (1 thread, "
        f"{args.connections} connections, {args.seconds} s a run, its own process); the consumer running. Every "
        "process shares this machine's cores: more replicas add no cores here.",
        f"- Rankings the replicas accepted: {accepted}; in the dataset after draining: {stored} "
        f"({'all there' if stored == accepted else 'MISMATCH'}).",
        "",
        "| replicas | rankings/s | p50 / p99 ms | errors | x direct | chats/s (2 answers) | p50 / p99 ms | errors "
        "| x direct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ranked, chats in rows:
        lines.append(
            f"| {name} | {ranked.rps:.0f} | {ranked.p50_ms:.1f} / {ranked.p99_ms:.1f} | {ranked.errors} | "
            f"{ranked.rps / base_rankings:.2f} | {chats.rps:.0f} | {chats.p50_ms:.1f} / {chats.p99_ms:.1f} | "
            f"{chats.errors} | {chats.rps / base_chats:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
