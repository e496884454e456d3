"""The chat-completions service: validate against the engine's limits, generate K candidates, keep the comparison.

Routes stay thin; everything a test wants to drive lives here, behind the small `Engine` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from redis.exceptions import RedisError

from api.errors import ApiError, error_type, out_of_memory, redis_full
from api.metrics import ServeMetrics
from api.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FinishReason,
    Usage,
)
from deploy.settings import Settings
from feedback.comparisons import ComparisonStore
from feedback.events import Comparison, StoredCandidate
from serve.engine import Alternatives, Candidate, CandidateDelta, Engine, EngineInputError, GenerationRequest
from serve.logprobs import choice_logprobs
from serve.outputs import json_output, refuse_tools
from serve.swap import Lease, ServedVersion

log = logging.getLogger(__name__)
MODEL_NAME = "rankloop"
REDIS_RETRY_AFTER_S = "5"
Sink = Callable[[Candidate, CandidateDelta], None]  # (the candidate so far, what it just gained)


@dataclass(frozen=True)
class Caller:
    """Who asked, as the route found out: the API key's name (RANKLOOP_AUTH=keys), who then may rank the
    comparison; the quota check a valid request passes before it generates (429 when spent); and what to charge
    with the tokens it generated, whole or cut short (deploy.quota)."""

    asker: str | None = None
    admit: Callable[[], Awaitable[None]] | None = None
    charge: Callable[[int], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Part:
    """One engine request of an answer: its candidates fill `positions` of the K, written by `version`."""

    generation: GenerationRequest
    positions: list[int]
    version: str


@dataclass
class Prepared:
    request: ChatCompletionRequest
    generation: GenerationRequest
    messages: list[dict[str, str]]
    policy_version: str
    started: float
    caller: Caller = Caller()
    parts: list[Part] = field(default_factory=list)  # fixed with the version, when generation starts

    def writers(self) -> list[str]:
        """The version that writes each of the K candidates."""
        found = [self.policy_version] * self.generation.n
        for part in self.parts:
            for position in part.positions:
                found[position] = part.version
        return found


class ChatService:
    def __init__(
        self,
        engine: Engine,
        comparisons: ComparisonStore,
        settings: Settings,
        metrics: ServeMetrics,
        served: ServedVersion,
    ) -> None:
        self.engine = engine
        self.comparisons = comparisons
        self.settings = settings
        self.metrics = metrics
        self.served = served
        self._charging: set[asyncio.Task[None]] = set()
        metrics.served_version.set(int(served.version.lstrip("v") or 0))

    @property
    def policy_version(self) -> str:
        return self.served.version

    # -- validation ---------------------------------------------------------------------------------
    def prepare(self, request: ChatCompletionRequest, caller: Caller = Caller()) -> Prepared:
        """Check the request against the model and limits; raise ApiError naming the field at fault."""
        self.served.check()  # before a stream starts: its status is still free to be 503
        if request.model not in (None, MODEL_NAME, self.policy_version):
            raise ApiError(
                404,
                f"model '{request.model}' is not served here; use '{MODEL_NAME}'",
                "model",
                "model_not_found",
            )
        refuse_tools(request, self.engine.tokenizer)
        constraint = json_output(request)
        if constraint is not None and not self.engine.supports_json:
            raise ApiError(
                400,
                "this server's engine cannot constrain answers to JSON (RANKLOOP_ENGINE=hf); leave out "
                "response_format, or serve with vLLM",
                "response_format",
                "unsupported_value",
            )
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt_ids = self._tokenize(messages)
        context = self.engine.max_model_len
        if len(prompt_ids) >= context:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; the context holds {context}: shorten the messages",
                "messages",
                "context_length_exceeded",
            )
        room = context - len(prompt_ids)
        max_tokens = request.requested_max_tokens()
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, room)
        elif max_tokens > self.settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {self.settings.max_tokens_limit}",
                "max_tokens",
                "invalid_value",
            )
        elif max_tokens > room:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens, so max_tokens can be at most {room} "
                f"(context {context}); it is {max_tokens}",
                "max_tokens",
                "context_length_exceeded",
            )
        n = request.n or self.settings.default_n
        if request.temperature == 0 and n > 1:
            raise ApiError(
                400,
                f"temperature 0 (greedy) makes all {n} candidates the same answer; ask for n=1, or for "
                "temperature > 0 to get candidates worth ranking",
                "temperature",
                "invalid_value",
            )
        generation = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt_token_ids=prompt_ids,
            n=n,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop_list(),
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            ignore_eos=request.ignore_eos,
            stream=request.stream,
            top_logprobs=request.top_logprobs or 0,
            json=constraint,
        )
        # The version is fixed when generation starts (ServedVersion.use), not here: a swap may come in between.
        return Prepared(request, generation, messages, "", time.monotonic(), caller)

    def _tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.engine.tokenizer
        # Render to text, then encode: the return type of tokenize=True differs across transformers versions.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        return ids

    async def _admitted(self, request: ChatCompletionRequest, caller: Caller) -> Prepared:
        """A request checked against the model and limits, then against the caller's quota: an invalid request
        costs no quota, and a request over it generates nothing."""
        prepared = self.prepare(request, caller)
        if caller.admit is not None:
            await caller.admit()
        return prepared

    # -- generation ---------------------------------------------------------------------------------
    async def _run(self, prepared: Prepared) -> AsyncGenerator[tuple[Candidate, CandidateDelta], None]:
        """Yield (candidate, what it gained) as tokens arrive; abort the engine request on cancel."""
        gen = prepared.generation
        candidates = {i: Candidate(i) for i in range(gen.n)}
        first = True
        self.metrics.in_flight.inc()
        try:
            async with aclosing(self._steps(prepared.parts)) as steps:
                async for deltas in steps:
                    if first and deltas:
                        self.metrics.first_token.observe(time.monotonic() - prepared.started)
                        first = False
                    for delta in deltas:
                        candidates[delta.index].add(delta)
                        yield candidates[delta.index], delta
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: stop spending compute on answers nobody will read, and charge what was
            # generated (a client that leaves before the end must not escape its token quota). Awaiting here
            # would be cancelled in turn: the charge runs on its own.
            for part in prepared.parts:
                await asyncio.shield(self.engine.abort(part.generation.request_id))
            self._charge_later(prepared, _generated(candidates.values()))
            raise
        else:
            await self._charge(prepared, _generated(candidates.values()))
        finally:
            self.metrics.in_flight.dec()

    async def _steps(self, parts: list[Part]) -> AsyncGenerator[list[CandidateDelta], None]:
        """The engine's steps of every part, each delta at its position among the K; one part streams straight
        through, several are merged as their steps arrive."""
        if len(parts) == 1 and parts[0].positions == list(range(parts[0].generation.n)):
            async with aclosing(self.engine.generate(parts[0].generation)) as steps:
                async for deltas in steps:
                    yield deltas
            return
        queue: asyncio.Queue[list[CandidateDelta] | Exception | None] = asyncio.Queue()

        async def pump(part: Part) -> None:
            failure: Exception | None = None
            try:
                async with aclosing(self.engine.generate(part.generation)) as steps:
                    async for deltas in steps:
                        queue.put_nowait([replace(d, index=part.positions[d.index]) for d in deltas])
            except Exception as exc:  # the caller raises it, as it would a single generation's
                failure = exc
            finally:  # whatever ends it (a cancel too), the merge never waits for this part again
                queue.put_nowait(failure)

        pumps = [asyncio.create_task(pump(part)) for part in parts]
        try:
            running = len(pumps)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def _parts(self, prepared: Prepared, lease: Lease) -> list[Part]:
        """The lease's version writes the answer, with its adapter; while a canary runs, in its share of
        comparisons the candidate writes `split` of the K, at random positions (rankers cannot tell which)."""
        gen = replace(prepared.generation, adapter=lease.adapter)
        canary, n = lease.canary, gen.n
        if canary is None or not 0 < canary.split < n or random.random() >= canary.share:
            return [Part(gen, list(range(n)), lease.version)]
        order = random.sample(range(n), n)
        theirs, ours = sorted(order[: canary.split]), sorted(order[canary.split :])
        candidate = replace(
            gen,
            request_id=f"{gen.request_id}-canary",
            n=len(theirs),
            adapter=canary.adapter,
            # vLLM seeds the i-th of n samples seed + i: past the current version's, so no draws are shared.
            seed=None if gen.seed is None else gen.seed + len(ours),
        )
        return [Part(replace(gen, n=len(ours)), ours, lease.version), Part(candidate, theirs, canary.version)]

    def _begin(self, prepared: Prepared, lease: Lease) -> None:
        """Fix the version that answers (and a canary's share of the answer) as the generation starts."""
        prepared.policy_version = lease.version
        prepared.parts = self._parts(prepared, lease)

    def _shown(self, prepared: Prepared, index: int) -> str | None:
        """Choice `index`'s writer where the operator shows versions (WRITER in api.protocol)."""
        return prepared.writers()[index] if self.settings.web_show_versions else None

    async def _collect(self, prepared: Prepared, lease: Lease, sink: Sink) -> bool:
        """Run the generation, each delta to `sink`; True when the lease was aborted (a swap's drain deadline)
        before the engine finished. Cancelling this (the client left) aborts the engine request too."""

        async def consume() -> None:
            async with aclosing(self._run(prepared)) as run:
                async for candidate, delta in run:
                    sink(candidate, delta)

        generation = asyncio.create_task(consume())
        aborted = asyncio.create_task(lease.aborted.wait())
        try:
            await asyncio.wait({generation, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
            if not generation.done():
                generation.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await generation
        if not generation.cancelled():
            try:
                generation.result()  # the engine's own errors reach the client as before
            except EngineInputError as exc:
                raise ApiError(400, f"the engine refused the request: {exc}", code="invalid_request") from exc
            return False
        return True

    async def complete(self, request: ChatCompletionRequest, caller: Caller = Caller()) -> ChatCompletionResponse:
        prepared = await self._admitted(request, caller)
        candidates: dict[int, Candidate] = {}

        def keep(candidate: Candidate, delta: CandidateDelta) -> None:
            candidates[candidate.index] = candidate

        async with self.served.use() as lease:
            self._begin(prepared, lease)
            cut = await self._collect(prepared, lease, keep)
        ordered = _ordered(candidates, prepared.generation.n, cut)
        await self._finish(prepared, ordered, store=not cut)
        return ChatCompletionResponse(
            id=prepared.generation.request_id,
            created=int(time.time()),
            model=MODEL_NAME,
            choices=[
                Choice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    finish_reason=_reason(c),
                    logprobs=self._logprobs(prepared, c.token_ids, c.logprobs, c.top),
                    policy_version=self._shown(prepared, c.index),
                )
                for c in ordered
            ],
            usage=self._usage(prepared, ordered),
            policy_version=prepared.policy_version,
        )

    async def stream(self, request: ChatCompletionRequest, caller: Caller = Caller()) -> AsyncGenerator[str, None]:
        """Validate now (errors become HTTP 4xx), then return the SSE body as an async iterator."""
        prepared = await self._admitted(request, caller)
        return self._sse(prepared)

    async def _sse(self, prepared: Prepared) -> AsyncGenerator[str, None]:
        """The SSE lines, written by a task that holds the served version only while the engine generates.

        Why a queue between them: a client that stops reading suspends this generator at its `yield`; were the
        generation inside it, it would hold the swap gate for as long, and every new request would wait behind
        the next promotion. The queue holds at most one answer's chunks (n x max_tokens), so it is unbounded."""
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        writer = asyncio.create_task(self._sse_lines(prepared, lines))
        try:
            while (line := await lines.get()) is not None:
                yield line
        finally:
            if not writer.done():
                writer.cancel()  # the client left: abort the generation
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _sse_lines(self, prepared: Prepared, lines: asyncio.Queue[str | None]) -> None:
        gen = prepared.generation
        created = int(time.time())

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(
                id=gen.request_id,
                created=created,
                model=MODEL_NAME,
                choices=choices,
                usage=usage,
                policy_version=prepared.policy_version,
            )
            return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

        candidates: dict[int, Candidate] = {}

        def send(candidate: Candidate, delta: CandidateDelta) -> None:
            candidates[candidate.index] = candidate
            logprobs = self._logprobs(prepared, delta.token_ids, delta.logprobs, delta.top)
            if delta.text or (logprobs is not None and delta.token_ids):
                content = ChunkChoice(index=candidate.index, delta=Delta(content=delta.text), logprobs=logprobs)
                lines.put_nowait(chunk([content]))
            if delta.finish_reason is not None:
                lines.put_nowait(
                    chunk([ChunkChoice(index=candidate.index, delta=Delta(), finish_reason=_reason(candidate))])
                )

        try:
            async with self.served.use() as lease:
                self._begin(prepared, lease)
                for i in range(gen.n):
                    first = ChunkChoice(
                        index=i, delta=Delta(role="assistant", content=""), policy_version=self._shown(prepared, i)
                    )
                    lines.put_nowait(chunk([first]))
                cut = await self._collect(prepared, lease, send)
            unfinished = [i for i in range(gen.n) if i not in candidates or candidates[i].finish_reason is None]
            ordered = _ordered(candidates, gen.n, cut)
            for i in unfinished if cut else []:  # each choice the swap cut ends, as the stream's contract says
                lines.put_nowait(chunk([ChunkChoice(index=i, delta=Delta(), finish_reason="abort")]))
            try:
                await self._finish(prepared, ordered, store=not cut)
            except ApiError as exc:
                lines.put_nowait(_error_line(exc))
            options = prepared.request.stream_options
            if options is not None and options.include_usage:
                lines.put_nowait(chunk([], self._usage(prepared, ordered)))
            lines.put_nowait("data: [DONE]\n\n")
        except ApiError as exc:  # the server broke (a failed swap) while this request waited for it
            lines.put_nowait(_error_line(exc))
        finally:
            lines.put_nowait(None)

    # -- bookkeeping --------------------------------------------------------------------------------
    def _logprobs(
        self, prepared: Prepared, token_ids: list[int], logprobs: list[float], top: list[Alternatives]
    ) -> ChoiceLogprobs | None:
        asked = prepared.request.top()
        if asked is None:
            return None
        return choice_logprobs(self.engine.tokenizer, token_ids, logprobs, top, asked)

    async def _charge(self, prepared: Prepared, tokens: int) -> None:
        charge = prepared.caller.charge
        if charge is None or tokens == 0:  # a cost of 0 would be a check, not a charge
            return
        try:
            await charge(tokens)
        except ApiError as exc:  # the answer is written: it is the caller's next request that waits
            log.warning("%d generated tokens not charged to the quota: %s", tokens, exc.message)

    def _charge_later(self, prepared: Prepared, tokens: int) -> None:
        task = asyncio.get_running_loop().create_task(self._charge(prepared, tokens))
        self._charging.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._charging.discard)

    def _usage(self, prepared: Prepared, candidates: list[Candidate]) -> Usage:
        prompt = len(prepared.generation.prompt_token_ids)
        completion = _generated(candidates)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def _finish(self, prepared: Prepared, candidates: list[Candidate], store: bool = True) -> None:
        """Count the request; keep its comparison unless a swap cut it short (half-written answers are not
        what users should rank)."""
        self.metrics.prompt_tokens.inc(len(prepared.generation.prompt_token_ids))
        self.metrics.completion_tokens.inc(_generated(candidates))
        self.metrics.latency.labels("chat").observe(time.monotonic() - prepared.started)
        if store and prepared.generation.n >= 2:
            await self._store(prepared, candidates)

    async def _store(self, prepared: Prepared, candidates: list[Candidate]) -> None:
        gen = prepared.generation
        comparison = Comparison(
            id=gen.request_id,
            messages=prepared.messages,
            prompt_token_ids=gen.prompt_token_ids,
            candidates=[
                StoredCandidate(
                    index=c.index,
                    text=c.text,
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    policy_version=writer if writer != prepared.policy_version else None,
                )
                for c, writer in zip(candidates, prepared.writers(), strict=True)
            ],
            policy_version=prepared.policy_version,
            created=time.time(),
            asker=prepared.caller.asker,
            sampling={
                "temperature": gen.temperature,
                "top_p": gen.top_p,
                "max_tokens": gen.max_tokens,
                "seed": gen.seed,
                "n": gen.n,
                # What else shaped the answers: PPO takes only plain samples of the version as its rollouts.
                "presence_penalty": gen.presence_penalty,
                "frequency_penalty": gen.frequency_penalty,
                "json": gen.json is not None,
            },
        )
        try:
            await self.comparisons.put(comparison)
        except RedisError as exc:
            log.error("could not store comparison %s: %s", gen.request_id, exc)
            if out_of_memory(exc):
                raise redis_full("the answers (to rank)") from exc
            raise ApiError(
                503,
                "the answers could not be stored for ranking (Redis unavailable); retry shortly",
                code="redis_unavailable",
                headers={"Retry-After": REDIS_RETRY_AFTER_S},
            ) from exc
        self.metrics.comparisons.inc()


def _error_line(exc: ApiError) -> str:
    """An error inside a stream already answered 200: an SSE line that says it, in OpenAI's error shape (the
    status it would have had as its type: a schema the engine refuses is the client's to fix, a failed swap not)."""
    body = {"message": exc.message, "type": error_type(exc.status), "param": exc.param, "code": exc.code}
    return f"data: {json.dumps({'error': body})}\n\n"


def _generated(candidates: Iterable[Candidate]) -> int:
    """Answer tokens written: the usage, the metric and the quota's charge count the same."""
    return sum(len(c.token_ids) for c in candidates)


def _ordered(candidates: dict[int, Candidate], n: int, cut: bool) -> list[Candidate]:
    """The n candidates in order; any the engine did not finish end "abort" (a cut generation, a client gone)."""
    ordered = [candidates.get(i, Candidate(i, finish_reason="abort")) for i in range(n)]
    if cut:
        for candidate in ordered:
            if candidate.finish_reason is None:
                candidate.finish_reason = "abort"
    return ordered


def _reason(candidate: Candidate) -> FinishReason | None:
    reason = candidate.finish_reason
    if reason is None:
        return None
    return "length" if reason == "length" else "abort" if reason == "abort" else "stop"
