"""Append synthetic feedback events through the real append script, from synchronous tests."""

from __future__ import annotations

import asyncio
import json

from redis.asyncio import Redis

from feedback.stream import FeedbackStream


def demonstration_json(i: int) -> str:
    """A demonstration event as the server writes it (feedback.events), question q<i>, answer a<i>."""
    return json.dumps(
        {
            "kind": "demonstration",
            "messages": [{"role": "user", "content": f"q{i}"}],
            "answer": f"a{i}",
            "user": None,
            "comparison_id": None,
            "policy_version": None,
            "created": 0.0,
        }
    )


def append_events(url: str, count: int, start: int = 0) -> list[str]:
    """Append `count` demonstration events (each with its own claim); return their stream ids in order."""

    async def go() -> list[str]:
        client = Redis.from_url(url)
        stream = FeedbackStream(client)
        ids = []
        for i in range(start, start + count):
            appended = await stream.append(
                "demonstration", demonstration_json(i), f"fp{i}", [stream.claim_key("t", str(i))], 600
            )
            assert appended.outcome == "new"
            ids.append(appended.event_id)
        await client.aclose()
        return ids

    return asyncio.run(go())
