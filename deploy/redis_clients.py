"""Every Redis client of rankloop, made one way: with timeouts, so that a Redis that stops answering (stopped,
overloaded, a network partition) fails a command after `redis_timeout_s` instead of hanging whoever sent it,
and with health checks, so that a connection the network dropped while idle is found before it is used.

Blocking reads (the follower's XREAD, the consumer's XREADGROUP) block for 1 s at most, well under the timeout.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from deploy.settings import Settings

CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_S = 30  # a connection idle this long is pinged before its next command


def options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_connect_timeout": min(CONNECT_TIMEOUT_S, settings.redis_timeout_s),
        "socket_timeout": settings.redis_timeout_s,
        "health_check_interval": HEALTH_CHECK_S,
    }


def sync_redis(settings: Settings) -> Redis:
    return Redis.from_url(settings.effective_redis_url, **options(settings))


def async_redis(settings: Settings) -> AsyncRedis:
    return AsyncRedis.from_url(settings.effective_redis_url, **options(settings))
