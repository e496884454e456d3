"""Feedback ingestion: rankings/s through `POST /v1/feedback` against a bare FastAPI endpoint that only validates.

Both servers run the same uvicorn configuration (one process, uvloop, httptools, no access log); the load comes
from `wrk` in its own process (`apt-get install wrk`), 1 thread, 32 connections, every request a new ranking of
one of the seeded comparisons. rankloop's server runs with the fake engine (generation is not measured here) on
the embedded Redis server with AOF as in production. Afterwards the consumer drains the stream into a fresh
dataset, and the dataset's count is compared with the rankings the server accepted. Figures go to BENCHMARKS.md.

    .venv/bin/python bench/feedback_ingest.py [--rounds 3] [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import bench_store  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from deploy.launcher import stop_group, wait_healthy  # noqa: E402
from deploy.redis_server import EmbeddedRedis  # noqa: E402

COMPARISONS = 1000
BARE, OURS = "bare FastAPI (validation only)", "rankloop /v1/feedback"


@dataclass
class WrkResult:
    name: str
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx responses and socket errors


def parse_wrk(name: str, output: str) -> WrkResult:
    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        assert match, output
        value, unit = float(match[1]), match[2]
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = (int(non2xx[1]) if non2xx else 0) + (sum(int(g) for g in sockets.groups()) if sockets else 0)
    return WrkResult(name, requests, rps, latency("50"), latency("99"), errors)


def wrk(name: str, url: str, seconds: int, connections: int, prefix: str, script: str = "feedback.lua") -> WrkResult:
    """One wrk run of bench/`script` (new rankings of the comparisons seeded under `prefix`, by default)."""
    run = str(time.time_ns())
    env = {**os.environ, "BENCH_COMPARISONS": str(COMPARISONS), "BENCH_PREFIX": prefix, "BENCH_RUN": run}
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(REPO / "bench" / script), url]
    output = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    result = parse_wrk(name, output)
    print(
        f"{name}: {result.rps:.0f} req/s, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"{result.errors} errors",
        flush=True,
    )
    return result


def start(argv: list[str], env: dict[str, str], url: str, log_name: str) -> subprocess.Popen[bytes]:
    log = open(Path(tempfile.gettempdir()) / log_name, "wb")  # noqa: SIM115
    process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True)
    wait_healthy(url, process, "/docs", timeout_s=60)  # both servers have the docs page; only rankloop /healthz
    return process


async def seed(redis_url: str, prefix: str) -> None:
    """Comparisons of realistic size: 4 candidates of 64 tokens with their log-probabilities."""
    from redis.asyncio import Redis

    from feedback.comparisons import ComparisonStore
    from feedback.events import Comparison, StoredCandidate

    client = Redis.from_url(redis_url)
    store = ComparisonStore(client, 3600)
    for i in range(COMPARISONS):
        candidates = [
            StoredCandidate(
                index=k, text="word " * 64, token_ids=list(range(64)), logprobs=[-1.25] * 64, finish_reason="length"
            )
            for k in range(4)
        ]
        await store.put(
            Comparison(
                id=f"{prefix}-{i}",
                messages=[{"role": "user", "content": "Write a haiku about rain."}],
                prompt_token_ids=list(range(20)),
                candidates=candidates,
                policy_version="v0001",
                created=time.time(),
            )
        )
    await client.aclose()


def accepted_rankings(url: str) -> int:
    metrics = httpx.get(url + "/metrics").text
    match = re.search(r'^rankloop_feedback_events_total\{kind="ranking",outcome="new"\} ([\d.e+]+)$', metrics, re.M)
    return int(float(match[1])) if match else 0


def drain(redis_url: str, path: Path) -> int:
    from redis import Redis

    from feedback.consumer import FeedbackConsumer
    from feedback.dataset import Dataset

    with Dataset(path) as dataset:
        # claim_idle_ms=0: take over whatever the stopped consumer left unacknowledged.
        FeedbackConsumer(Redis.from_url(redis_url), dataset, "bench", batch=1000, claim_idle_ms=0).drain()
        return dataset.count("ranking")


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs: the share stolen by the hypervisor makes absolute figures noisy."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per server, alternating which goes first")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    bench_store(args.data_dir)  # the fake engine still needs v0001's tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    bare_url, ours_url = "http://127.0.0.1:8105", "http://127.0.0.1:8106"
    runs: list[WrkResult] = []
    with EmbeddedRedis(work / "redis", 6397) as redis_server:
        prefix = f"chatcmpl-bench{int(time.time())}"
        asyncio.run(seed(redis_server.url, prefix))
        env = {
            "RANKLOOP_DATA_DIR": str(args.data_dir),
            "RANKLOOP_PORT": "8106",
            "RANKLOOP_ENGINE": "fake",
            "REDIS_URL": redis_server.url,
            # Its load spreads ~20k rankings a run over 1000 comparisons, each from a new user: far past the cap.
            "RANKLOOP_MAX_RANKINGS_PER_COMPARISON": "0",
        }
        bare = start(
            [sys.executable, "-m", "bench.bare_feedback", "8105"], {"PYTHONPATH": str(REPO)}, bare_url, "bench-bare.log"
        )
        server = start([sys.executable, "-m", "rankloop", "serve"], env, ours_url, "bench-feedback.log")
        # The consumer runs throughout, as `rankloop up` runs it: it costs CPU, and it keeps the stream short.
        consumer_env = {**os.environ, **env, "RANKLOOP_DATA_DIR": str(work)}
        consume = [sys.executable, "-m", "rankloop", "feedback", "consume"]
        quiet = subprocess.DEVNULL
        consumer = subprocess.Popen(consume, env=consumer_env, stdout=quiet, stderr=quiet, start_new_session=True)
        steal0, total0 = cpu_times()
        try:
            for round_ in range(args.rounds):
                order = [(BARE, bare_url), (OURS, ours_url)]
                for name, url in order if round_ % 2 == 0 else order[::-1]:
                    runs.append(wrk(name, url, args.seconds, args.connections, f"{prefix}"))
            accepted = accepted_rankings(ours_url)
        finally:
            stop_group(bare)
            stop_group(server)
            stop_group(consumer)
        steal1, total1 = cpu_times()
        stored = drain(redis_server.url, work / "feedback.sqlite3")
    steal = (steal1 - steal0) / max(1, total1 - total0)
    print(f"accepted {accepted}, in the dataset {stored}; CPU steal {steal:.0%}")
    write_section("feedback_ingest", render(runs, accepted, stored, steal, args))
    shutil.rmtree(work, ignore_errors=True)


def render(runs: list[WrkResult], accepted: int, stored: int, steal: float, args: argparse.Namespace) -> str:
    def median(name: str) -> WrkResult:
        rows = [r for r in runs if r.name == name]
        return WrkResult(
            name,
            sum(r.requests for r in rows),
            statistics.median(r.rps for r in rows),
            statistics.median(r.p50_ms for r in rows),
            statistics.median(r.p99_ms for r in rows),
            sum(r.errors for r in rows),
        )

    def row(r: WrkResult) -> str:
        return f"| {r.name} | {r.rps:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.requests} | {r.errors} |"

    base, ours = median(BARE), median(OURS)
    per_run = ", ".join(f"{r.name.split()[0]} {r.rps:.0f}" for r in runs)
    return "\n".join(
        [
            "## Feedback ingestion (issue 3)",
            "",
            f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()} "
            f"({platform.platform()}); CPU time stolen by the hypervisor during the runs: {steal:.0%}.",
            f"- Command: `.venv/bin/python bench/feedback_ingest.py --rounds {args.rounds} --seconds {args.seconds} "
            f"--connections {args.connections}` (`make bench`).",
            f"- Load: wrk (1 thread, {args.connections} connections, its own process), {args.rounds} runs of "
            f"{args.seconds} s per server, alternating which goes first; figures are medians over the runs (requests "
            f"and errors are totals). Every request is a new ranking of one of {COMPARISONS} seeded comparisons "
            "(4 candidates of 64 tokens). Both servers: one uvicorn process, uvloop, httptools, no access log, on the "
            "same 2 cores as wrk and Redis.",
            "- The feedback consumer (`rankloop feedback consume`) runs throughout, as `rankloop up` runs it, moving "
            "events into the SQLite dataset; after the runs it is stopped and the stream drained.",
            "- rankloop: validate, then one Lua call (claims, comparison lookup, the comparison streamed before its "
            "first ranking, XADD) on the embedded "
            "Redis with AOF everysec; calls that arrive while earlier ones are on the wire go together in one pipeline "
            "(up to 4 pipelines in flight).",
            "",
            "| server | requests/s | p50 (ms) | p99 (ms) | requests | errors |",
            "|---|---|---|---|---|---|",
            row(base),
            row(ours),
            "",
            f"Per run (requests/s): {per_run}.",
            "",
            f"Ratio rankloop / bare endpoint: **{ours.rps / base.rps:.2f}x** (target >= 0.5x); targets >= 2,000 "
            f"rankings/s and p99 <= 50 ms. Accepted rankings (server counter): {accepted}; in the dataset after the "
            f"consumer drained the stream: {stored} ({'all present' if stored == accepted else 'MISMATCH'}). wrk "
            "counts fewer requests than the server accepted: those in flight when each run ended.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
