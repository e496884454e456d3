"""Where the feedback pipeline stands: stream length, pending and lag of the learner's group."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from redis import Redis

from deploy.redis_server import as_text, memory_warning
from feedback.consumer import GROUP
from feedback.dataset import Dataset
from feedback.stream import STREAM_KEY

BACKLOG_WARNING_SHARE = 0.8


def backlog_warning(length: int, bound: int) -> str | None:
    """A warning when the stream holds more than BACKLOG_WARNING_SHARE of its bound (feedback.stream)."""
    if not bound or length <= BACKLOG_WARNING_SHARE * bound:
        return None
    return (
        f"the feedback stream holds {length} entries of at most {bound}: at the bound feedback is refused (503); "
        "is the learner (or `rankloop feedback consume`) running?"
    )


@dataclass(frozen=True)
class StreamStatus:
    length: int  # entries in the stream (acknowledged ones are trimmed as the consumer goes)
    pending: int  # delivered to a consumer, not yet acknowledged
    lag: int  # appended, not yet delivered to any consumer
    consumers: int
    group_exists: bool


def stream_status(redis: Redis, stream: str = STREAM_KEY, group: str = GROUP) -> StreamStatus:
    length = int(redis.xlen(stream))
    groups = {as_text(g["name"]): g for g in redis.xinfo_groups(stream)} if redis.exists(stream) else {}
    info = groups.get(group)
    if info is None:
        return StreamStatus(length, 0, length, 0, False)
    lag = info.get("lag")
    if lag is None:  # Redis 6.2 has no `lag` field (7.0 does, and sends None when it cannot tell): count
        lag = _count_after(redis, stream, as_text(info["last-delivered-id"]))
    return StreamStatus(length, int(info["pending"]), int(lag), int(info["consumers"]), True)


def _count_after(redis: Redis, stream: str, last_id: str, page: int = 1000) -> int:
    count, start = 0, "(" + last_id
    while entries := redis.xrange(stream, min=start, max="+", count=page):
        count += len(entries)
        last: bytes | str = entries[-1][0]  # type: ignore[assignment]  # an entry id is never None
        start = "(" + as_text(last)
    return count


def health(redis: Redis, dataset_path: Path, max_backlog: int) -> dict[str, Any]:
    """The pipeline's figures, as `rankloop feedback stats --json` prints them and the console shows them: counts in
    the dataset by kind, the stream against its bound, Redis's memory against its limit, and warnings."""
    counts, compared, rejected = {"ranking": 0, "demonstration": 0}, 0, 0
    if dataset_path.is_file():  # a reader does not create the learner's dataset where there is none
        with Dataset(dataset_path) as dataset:
            counts.update(dataset.counts())
            compared, rejected = dataset.comparison_count(), len(dataset.rejected())
    stream, memory = stream_status(redis), redis.info("memory")
    warnings = [w for w in (memory_warning(memory), backlog_warning(stream.length, max_backlog)) if w]
    return {
        "dataset": counts,
        "comparisons": compared,
        "rejected": rejected,
        "stream": {**asdict(stream), "max_backlog": max_backlog},
        "redis_memory": {"used_bytes": int(memory["used_memory"]), "max_bytes": int(memory.get("maxmemory", 0))},
        "warnings": warnings,
    }
