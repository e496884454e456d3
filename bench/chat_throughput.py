"""Chat throughput: rankloop's endpoint against plain vLLM's OpenAI server, and HF `generate` as the naive baseline.

Workload: the first turn of the 80 MT-bench questions, n=4 candidates, max_tokens=64, temperature 0.8,
8 concurrent clients. Both servers run the same model folder with the same engine flags, one after the other
in this one run (two cores cannot host both at once without each slowing the other). Figures go to BENCHMARKS.md.

    .venv/bin/python bench/chat_throughput.py [--rounds 2] [--hf-prompts 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

MT_BENCH = REPO.parent / "shared" / "data" / "mt-bench-questions.jsonl"
N, MAX_TOKENS, TEMPERATURE, CLIENTS = 4, 64, 0.8, 8
ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}


@dataclass
class Result:
    name: str
    seconds: float
    completion_tokens: int
    latencies: list[float]

    @property
    def tok_s(self) -> float:
        return self.completion_tokens / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prompts() -> list[str]:
    rows = [json.loads(line) for line in MT_BENCH.read_text().splitlines() if line.strip()]
    return [row["turns"][0] for row in rows]


async def _load(base_url: str, model: str, questions: list[str], extra: dict[str, object] | None = None) -> Result:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for q in questions:
        queue.put_nowait(q)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            question = queue.get_nowait()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "n": N,
                "max_tokens": MAX_TOKENS,
                "temperature": TEMPERATURE,
                **(extra or {}),
            }
            started = time.perf_counter()
            response = await http.post(f"{base_url}/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        return Result("", time.perf_counter() - started, tokens, latencies)


Pass = tuple[str, dict[str, object]]  # (name in the table, extra request fields)


def run_server(argv: list[str], env: dict[str, str], url: str, ready: str, passes: list[Pass]) -> list[Result]:
    """Start one server, warm it up, then run each pass of the workload against it in turn."""
    name = passes[0][0]
    log = open(Path(tempfile.gettempdir()) / f"bench-{name.split()[0]}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True)
    try:
        ready_s = wait_healthy(url, process, ready)
        print(f"{name}: ready in {ready_s:.0f} s; warming up", flush=True)
        asyncio.run(_load(url, "rankloop", prompts()[:CLIENTS]))
        results = []
        for pass_name, extra in passes:
            result = asyncio.run(_load(url, "rankloop", prompts(), extra))
            result.name = pass_name
            print(f"{pass_name}: {result.tok_s:.1f} tok/s, p95 {result.pct(0.95):.2f} s", flush=True)
            results.append(result)
        return results
    finally:
        stop_group(process)


PLAIN, PLAIN_LOGPROBS, RANKLOOP = "plain vLLM", "plain vLLM + logprobs", "rankloop"


def plain_vllm(model_dir: Path, port: int) -> list[Result]:
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "rankloop",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--enable-prefix-caching",
        "--disable-log-stats",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # The second pass asks for what rankloop always computes: the sampled token's log-probability.
    passes: list[Pass] = [(PLAIN, {}), (PLAIN_LOGPROBS, {"logprobs": True, "top_logprobs": 0})]
    return run_server(argv, ENGINE_ENV, f"http://127.0.0.1:{port}", "/health", passes)


def rankloop(data_dir: Path, port: int, redis_url: str) -> list[Result]:
    env = {**ENGINE_ENV, "RANKLOOP_DATA_DIR": str(data_dir), "RANKLOOP_PORT": str(port), "REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "rankloop", "serve"]
    return run_server(argv, env, f"http://127.0.0.1:{port}", "/healthz", [(RANKLOOP, {})])


def hf_generate(model_dir: Path, count: int) -> Result:
    """Sequential `generate` over the first `count` prompts: a rate, so a subset keeps the run short."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # fp32: on this CPU bf16 matmuls are slower than fp32 in eager PyTorch.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    latencies: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for question in prompts()[:count]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **ids,
                do_sample=True,
                temperature=TEMPERATURE,
                max_new_tokens=MAX_TOKENS,
                num_return_sequences=N,
                pad_token_id=pad,
            )
        latencies.append(time.perf_counter() - t0)
        tokens += int((out[:, ids["input_ids"].shape[1] :] != pad).sum())  # answers that ended early are padded
    result = Result("HF generate (sequential, fp32)", time.perf_counter() - started, tokens, latencies)
    print(f"HF: {result.tok_s:.1f} tok/s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternate plain vLLM and rankloop this many times")
    parser.add_argument("--hf-prompts", type=int, default=16, help="prompts for the HF generate baseline (0: skip)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "var" / "test-data")
    args = parser.parse_args()
    if not MT_BENCH.is_file():
        sys.exit(f"skipped: {MT_BENCH} is absent")
    store = bench_store(args.data_dir)
    model_dir = store.path(store.current() or "v0001")

    results: list[Result] = []
    with EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-redis-")), 6395) as redis_server:
        for round_ in range(args.rounds):
            # Alternate which server goes first, so that a drift of the machine does not favour either.
            first_plain = round_ % 2 == 0
            if first_plain:
                results += plain_vllm(model_dir, 8101)
            results += rankloop(args.data_dir, 8102, redis_server.url)
            if not first_plain:
                results += plain_vllm(model_dir, 8101)
    hf = None if args.hf_prompts == 0 else hf_generate(model_dir, args.hf_prompts)
    write_section("chat_throughput", render(results, hf, args))


def render(results: list[Result], hf: Result | None, args: argparse.Namespace) -> str:
    def agg(name: str) -> tuple[float, float, float]:
        rows = [r for r in results if r.name == name]
        return (
            statistics.mean(r.tok_s for r in rows),
            statistics.mean(r.pct(0.5) for r in rows),
            statistics.mean(r.pct(0.95) for r in rows),
        )

    def row(label: str, figures: tuple[float, float, float]) -> str:
        return f"| {label} | {figures[0]:.1f} | {figures[1]:.2f} | {figures[2]:.2f} |"

    base, base_lp, ours = agg(PLAIN), agg(PLAIN_LOGPROBS), agg(RANKLOOP)
    command = "`.venv/bin/python bench/chat_throughput.py --rounds " + f"{args.rounds} --hf-prompts {args.hf_prompts}`"
    lines = [
        "## Chat endpoint throughput (issue 2)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; machine: {machine()} "
        f"({platform.platform()}); figures are means over {args.rounds} round(s); the server that goes first "
        "alternates from round to round.",
        f"- Command: {command} (`make bench`).",
        f"- Workload: 80 MT-bench first turns, n={N}, max_tokens={MAX_TOKENS}, temperature {TEMPERATURE}, "
        f"{CLIENTS} concurrent clients, non-streaming; one warm-up pass of {CLIENTS} requests per server start.",
        "- Engine: vLLM 0.32.0 CPU, eager (`--enforce-eager`), bf16, max_model_len 2048, prefix caching, all cores "
        "bound (`VLLM_CPU_OMP_THREADS_BIND`), 2 GiB KV cache. Eager because compiled mode recompiles on every "
        "start on this machine (110-156 s to ready against ~50 s); a server that restarts must come back fast.",
        "- rankloop always asks the engine for the sampled token's log-probability (stored with each comparison for "
        "PPO); `plain vLLM + logprobs` is the same plain server asked for the same "
        "(`logprobs: true, top_logprobs: 0`).",
        "",
        "| server | completion tok/s | p50 latency (s) | p95 latency (s) |",
        "|---|---|---|---|",
        row("plain vLLM OpenAI server", base),
        row("plain vLLM OpenAI server + logprobs", base_lp),
        row("rankloop (logprobs, comparison stored in Redis)", ours),
    ]
    if hf is not None:
        lines.append(
            f"| {hf.name}, first {args.hf_prompts} prompts | {hf.tok_s:.1f} | {hf.pct(0.5):.2f} | {hf.pct(0.95):.2f} |"
        )
    lines += [
        "",
        f"Ratios rankloop / plain vLLM: throughput **{ours[0] / base[0]:.3f}x**, "
        f"p95 latency **{ours[2] / base[2]:.3f}x**."
        f" Against plain vLLM doing the same work (+ logprobs): throughput **{ours[0] / base_lp[0]:.3f}x**, "
        f"p95 latency **{ours[2] / base_lp[2]:.3f}x**. Targets: throughput >= 0.95x, p95 <= 1.1x."
        + (f" rankloop / HF generate throughput: {ours[0] / hf.tok_s:.2f}x." if hf else ""),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
