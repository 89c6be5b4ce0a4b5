"""Load clients of the pipeline benchmark, each run in a process of its own (``multiprocessing``).

- :func:`http_jobs`: ``POST /jobs`` over ``concurrency`` keep-alive connections
  (:mod:`bench.http_client`), ``count`` requests in all, optionally paced;
- :func:`arq_jobs`: arq's own ``enqueue_job("noop")`` from ``concurrency`` tasks on one pool.

Each sends one dict back on its pipe: start and end times (epoch s), statuses, the per-request
latencies (ms) and the CPU seconds the process spent sending.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from .harness import AUTH
from .http_client import Connection as HttpConnection

NOOP_BODY = b'{"type": "bench.noop", "params": {}}'
HEADERS = {"Content-Type": "application/json", "Authorization": AUTH}

Lane = TypeVar("Lane")


async def drive(
    count: int, lanes: Sequence[Lane], one: Callable[[Lane], Awaitable[int]], interval_s: float = 0.0
) -> dict[str, Any]:
    """Make ``count`` calls of ``one``, each lane (a connection) one call at a time."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    remaining = count

    async def run(lane: Lane) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t = time.perf_counter()
            statuses[await one(lane)] += 1
            latencies.append(1000 * (time.perf_counter() - t))
            if interval_s:
                await asyncio.sleep(interval_s)

    cpu0, t0 = time.process_time(), time.time()
    await asyncio.gather(*(run(lane) for lane in lanes))
    return {
        "t0": t0,
        "t1": time.time(),
        "cpu": time.process_time() - cpu0,
        "statuses": dict(statuses),
        "latencies": latencies,
    }


def http_jobs(pipe: Connection, port: int, count: int, concurrency: int, interval_s: float = 0.0) -> None:
    import uvloop

    async def main() -> dict[str, Any]:
        conns = [HttpConnection("127.0.0.1", port) for _ in range(concurrency)]
        for c in conns:
            await c.open()

        async def one(conn: HttpConnection) -> int:
            status, _ = await conn.request("POST", "/jobs", NOOP_BODY, HEADERS)
            return status

        result = await drive(count, conns, one, interval_s)
        for c in conns:
            await c.close()
        return result

    pipe.send(uvloop.run(main()))


def arq_jobs(pipe: Connection, redis_url: str, count: int, concurrency: int, interval_s: float = 0.0) -> None:
    import uvloop

    from .arq_ref import enqueue, pool

    async def main() -> dict[str, Any]:
        redis = await pool(redis_url)

        async def one(_: int) -> int:
            await enqueue(redis)
            return 202

        result = await drive(count, range(concurrency), one, interval_s)
        await redis.aclose()
        return result

    pipe.send(uvloop.run(main()))
