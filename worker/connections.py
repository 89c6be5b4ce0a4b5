"""Redis clients, one per URL: every Jobcast process makes its clients here (one per cell)."""

from __future__ import annotations

from redis.asyncio import Redis


def redis_for(url: str) -> Redis:
    """A Redis client as every Jobcast process uses it (text replies, reconnects on its own)."""
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )
    return client
