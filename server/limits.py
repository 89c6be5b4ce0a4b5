"""Per-tenant submission rate limit, enforced in Redis so it holds across server processes.

``JOBCAST_SUBMIT_RATE=N/S`` allows N submissions per S seconds per tenant, as a burst of up to N
that refills evenly (GCRA, see ``worker/lua/ratelimit.lua``). Answers carry the IETF
``RateLimit-Policy`` / ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers), on successes
too, so clients can pace themselves; a refusal is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from redis.asyncio import Redis

from worker import schema
from worker.settings import ConfigError

RATE_RE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*")
POLICY = "submit"


def parse_rate(raw: str) -> tuple[int, float] | None:
    """``"N/S"`` -> (N, S); empty -> None (no limit). Raises ConfigError otherwise."""
    if not raw.strip():
        return None
    match = RATE_RE.fullmatch(raw)
    if match is None or int(match[1]) < 1 or float(match[2]) <= 0:
        raise ConfigError(
            f"JOBCAST_SUBMIT_RATE={raw!r} is not of the form N/S with N >= 1 and S > 0 "
            "(e.g. '100/60' for 100 submissions a minute per tenant), or empty for no limit."
        )
    return int(match[1]), float(match[2])


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    retry_after_s: int = 0


class RateLimiter:
    def __init__(self, redis: Redis, rate: tuple[int, float]) -> None:
        self.limit, self.window_s = rate
        # Whole milliseconds keep the state an exact integer in Redis.
        self._interval_ms = max(1, round(self.window_s * 1000 / self.limit))
        self._tau_ms = self._interval_ms * (self.limit - 1)
        self._script = schema.RateLimitScript(redis)
        self._policy = f'"{POLICY}";q={self.limit};w={math.ceil(self.window_s)}'

    async def take(self, tenant: str) -> Decision:
        allowed, remaining, retry_ms, reset_ms = await self._script(
            schema.rate_key(tenant), self._interval_ms, self._tau_ms
        )
        headers = {
            "RateLimit-Policy": self._policy,
            "RateLimit": f'"{POLICY}";r={remaining};t={math.ceil(reset_ms / 1000)}',
        }
        if allowed:
            return Decision(True, headers)
        retry_after = max(1, math.ceil(retry_ms / 1000))
        headers["Retry-After"] = str(retry_after)
        return Decision(False, headers, retry_after)
