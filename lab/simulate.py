"""Simulated users: they ask the served model through the public HTTP API, rank its K answers by a scripted
preference (with some disagreement), and send the ranking back, exactly as people would. The learner never sees
the preference, only the rankings.

Users take training prompts only; the held-out prompts (learn.rm_data.is_held_out, the learner's own split) are
kept for evaluation, so no version is ever judged on a prompt its users asked.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lab.preferences import Scorer, rank
from learn.prompts import conversations, split_prompts, unique
from learn.rm_data import prompt_key

HELD_OUT = 0.1  # the learner's default held-out share; the same prompts stay out of users' hands


def read_prompts(paths: list[Path]) -> list[list[dict[str, str]]]:
    """Each file's prompts (chat, Alpaca, MT-bench first turns, plain `prompt`), once each, in order."""
    return unique((messages for path in paths for messages in conversations(path)), prompt_key)


def split(
    prompts: list[list[dict[str, str]]], fraction: float = HELD_OUT
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """(train, held out) by the learner's split of the same prompt keys."""
    return split_prompts(prompts, prompt_key, fraction)


@dataclass
class Tally:
    comparisons: int = 0
    rankings: int = 0
    errors: int = 0
    version: str = "?"
    versions: dict[str, int] = field(default_factory=dict)  # rankings per policy version that wrote the answers
    last_error: str = ""


@dataclass(frozen=True)
class Plan:
    url: str
    prompts: list[list[dict[str, str]]]
    scorer: Scorer
    users: int = 4
    k: int = 4
    noise: float = 0.1
    rate: float = 0.0  # rankings per second over all users; 0: as fast as the server answers
    duration_s: float = 60.0
    max_rankings: int | None = None  # stop once this many rankings are in (whichever comes first)
    max_tokens: int | None = None  # None: the server's default length
    temperature: float = 1.0
    seed: int = 0
    seeded_sampling: bool = False  # each request carries a seed from the user's RNG: with one user, a rerun repeats
    api_key: str | None = None  # RANKLOOP_AUTH=keys: every simulated user asks and ranks as this key's holder


class Pacer:
    """Spaces the users' requests so that all of them together make `rate` per second."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = time.monotonic()
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            delay = self.next - time.monotonic()
            self.next = max(self.next, time.monotonic()) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


async def one_user(user: int, plan: Plan, http: httpx.AsyncClient, pacer: Pacer, tally: Tally, deadline: float) -> None:
    rng = random.Random(plan.seed * 10_007 + user)
    while time.monotonic() < deadline and (plan.max_rankings is None or tally.rankings < plan.max_rankings):
        await pacer.wait()
        messages = rng.choice(plan.prompts)
        request: dict[str, object] = {"messages": messages, "n": plan.k, "temperature": plan.temperature}
        if plan.max_tokens is not None:
            request["max_tokens"] = plan.max_tokens
        if plan.seeded_sampling:
            request["seed"] = rng.randrange(2**31)
        try:
            served = await http.post("/v1/chat/completions", json=request)
            served.raise_for_status()
            body = served.json()
            tally.comparisons += 1
            answers = [choice["message"]["content"] or "" for choice in body["choices"]]
            prompt = messages[-1]["content"]
            tiers = rank([plan.scorer(prompt, a) for a in answers], plan.noise, rng)
            if len(tiers) < 2:
                continue  # all answers equally good to this user: nothing to say
            # With a key, the key names the user (a different `user` would be refused).
            who = {} if plan.api_key else {"user": f"sim-{user}"}
            sent = await http.post("/v1/feedback", json={"comparison_id": body["id"], "ranking": tiers, **who})
            sent.raise_for_status()
            tally.rankings += 1
            tally.version = body["policy_version"]
            tally.versions[tally.version] = tally.versions.get(tally.version, 0) + 1
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            tally.errors += 1
            tally.last_error = f"{type(exc).__name__}: {exc}"[:200]
            await asyncio.sleep(1.0)  # a server restarting or swapping: back off, then go on


async def simulate(plan: Plan, on_tick: Callable[[Tally, float], None] | None = None, tick_s: float = 1.0) -> Tally:
    """Run `plan.users` users for `plan.duration_s` seconds; `on_tick` sees the tally every `tick_s`."""
    tally, pacer = Tally(), Pacer(plan.rate)
    started = time.monotonic()
    deadline = started + plan.duration_s
    timeout = httpx.Timeout(600.0, connect=10.0)  # answers wait out a swap's drain and load
    headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    async with httpx.AsyncClient(base_url=plan.url, timeout=timeout, headers=headers) as http:
        users = [asyncio.create_task(one_user(u, plan, http, pacer, tally, deadline)) for u in range(plan.users)]
        while not all(u.done() for u in users):
            await asyncio.wait(users, timeout=tick_s)
            if on_tick is not None:
                on_tick(tally, time.monotonic() - started)
        for task in users:
            task.result()  # surface a bug rather than a silent stop
    return tally
