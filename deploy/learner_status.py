"""Where the learner stands, as it publishes it in Redis: read by `rankloop learn status`, the operator console and
the loop demo, written by the learner daemon (learn.daemon)."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

STATUS_KEY = "rankloop:learner:status"


def read_status(redis: Redis) -> dict[str, Any] | None:
    """The learner's last published status (phase, detail, updated, progress, last_round), or None before any."""
    raw = redis.get(STATUS_KEY)
    return json.loads(raw) if raw else None
