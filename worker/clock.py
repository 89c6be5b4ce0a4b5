"""Wall-clock time as Jobcast writes it: RFC 3339 UTC with microseconds, and epoch milliseconds."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    # Formatting the date is most of the cost, and every Lua call needs a timestamp: once a second.
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    return f"{_second(seconds)}.{rest // 1000:06d}Z"


def now() -> tuple[str, int]:
    """The current time as (RFC 3339 string, epoch milliseconds), read once so both agree."""
    ns = time.time_ns()
    return rfc3339(ns), ns // 1_000_000
