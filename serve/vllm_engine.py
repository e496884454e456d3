"""The real engine: vLLM's AsyncLLM in this process (its engine core runs in a child process it manages)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from deploy.hardware import has_cuda
from deploy.settings import Settings
from serve.engine import AdapterRef, Alternatives, CandidateDelta, EngineInputError, GenerationRequest, JsonOutput

log = logging.getLogger(__name__)


def configure_cpu_environment(settings: Settings) -> None:
    """Thread budget and KV cache of the CPU backend; read by vLLM when its engine starts."""
    cores = settings.cpu_threads if settings.cpu_threads != "all" else f"0-{(os.cpu_count() or 1) - 1}"
    # By default vLLM CPU binds one OpenMP thread here; both cores nearly double throughput.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))


MAX_LORAS = 2  # adapters in one batch: the current version's and a canary's


class VllmEngine:
    supports_json = True  # structured outputs (xgrammar, guidance, outlines)

    def __init__(self, llm: Any, tokenizer: Any, max_model_len: int, adapters: bool = False) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.supports_adapters = adapters  # started with LoRA (RANKLOOP_SERVE_ADAPTERS, a rank limit above 0)

    @classmethod
    def start(cls, settings: Settings, model_dir: Path) -> VllmEngine:
        """Build the engine; call from inside the running event loop (AsyncLLM starts tasks on it)."""
        gpu = has_cuda()
        if not gpu:
            configure_cpu_environment(settings)
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Eager on CPU: compiled starts in 110-156 s (its cache fails to load on every start) against ~41 s.
        eager = settings.enforce_eager if settings.enforce_eager is not None else not gpu
        args = AsyncEngineArgs(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype="bfloat16",
            max_model_len=settings.max_model_len,
            enforce_eager=eager,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            disable_log_stats=True,
            enable_prefix_caching=True,  # keyed by adapter too: cached prefixes never cross versions
            **lora_arguments(settings),
        )
        log.info(
            "starting vLLM on %s (%s) with %s",
            "GPU" if gpu else "CPU",
            "eager" if eager else "compiled",
            model_dir,
        )
        llm = AsyncLLM.from_engine_args(args)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls(llm, tokenizer, settings.max_model_len, adapters=bool(lora_arguments(settings)))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[list[CandidateDelta], None]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=request.n,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop or None,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            ignore_eos=request.ignore_eos,
            # The sampled token's log-probability always (PPO needs it); the top-k only where the client asks.
            logprobs=request.top_logprobs,
            structured_outputs=_structured(request.json),
            # Non-streaming answers arrive once, whole: per-token deltas would cost this process CPU that the
            # engine needs (on 2 cores that was 15% of throughput).
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
        )
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        lora = _lora_request(request.adapter)
        try:
            async for output in self.llm.generate(prompt, params, request.request_id, lora_request=lora):
                yield [_delta(c, request.top_logprobs) for c in output.outputs]
        except VLLMValidationError as exc:  # raised before the first token: what the request asked for
            raise EngineInputError(str(exc)) from exc

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def unfinished(self) -> int:
        return int(self.llm.output_processor.get_num_unfinished_requests())

    async def healthy(self) -> bool:
        try:
            await self.llm.check_health()
        except Exception:  # a dead engine raises its own error type: all mean "down"
            return False
        return True

    async def load_weights(self, folder: Path) -> None:
        # mode="wait": anything still in the engine finishes first (never "keep": it would mix weights inside an
        # answer); the server's gate has drained its own requests already.
        await self.llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
            await self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        finally:
            await self.llm.resume_generation()

    async def add_adapter(self, adapter: AdapterRef) -> None:
        if not self.supports_adapters:
            raise RuntimeError("this engine was started without adapters (RANKLOOP_SERVE_ADAPTERS=false)")
        if not await self.llm.add_lora(_lora_request(adapter)):
            raise RuntimeError(f"vLLM did not load {adapter.version}'s adapter from {adapter.folder}")

    async def shutdown(self) -> None:
        self.llm.shutdown()


def lora_arguments(settings: Settings) -> dict[str, Any]:
    """vLLM's LoRA settings where versions are served as adapters; none otherwise (LoRA costs some throughput)."""
    if not settings.adapters_served:
        return {}
    return {
        "enable_lora": True,
        "max_lora_rank": settings.max_adapter_rank,
        "max_loras": MAX_LORAS,
        "max_cpu_loras": 2 * MAX_LORAS,  # the last few stay loaded: a rollback to one is a switch too
    }


def _lora_request(adapter: AdapterRef | None) -> Any:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.version, adapter.number, str(adapter.folder))


def _structured(json: JsonOutput | None) -> Any:
    if json is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if json.schema is None:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=json.schema)


def _delta(completion: Any, top: int) -> CandidateDelta:
    token_ids = list(completion.token_ids)
    logprobs: list[float] = []
    alternatives: list[Alternatives] = []
    for token_id, position in zip(token_ids, completion.logprobs or [], strict=False):
        entry = position.get(token_id)
        logprobs.append(float(entry.logprob) if entry is not None else float("nan"))
        if top:
            # vLLM gives the top k, plus the sampled token where it is not among them.
            ranked = sorted(position.items(), key=lambda item: -float(item[1].logprob))[:top]
            alternatives.append([(t, float(e.logprob)) for t, e in ranked])
    missing = len(token_ids) - len(logprobs)  # never seen; a token without its figure must not fail the answer
    logprobs += [float("nan")] * missing
    alternatives += [[] for _ in range(missing if top else 0)]
    return CandidateDelta(
        completion.index, completion.text, token_ids, logprobs, completion.finish_reason, alternatives
    )
