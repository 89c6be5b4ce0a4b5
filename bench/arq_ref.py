"""The reference for the job pipeline: raw arq 0.28 with a no-op job, tuned fairly.

    python -m bench.arq_ref --redis-url URL [--max-jobs 10] [--poll-delay 0.01]

runs one arq worker until SIGTERM, like ``jobcast worker`` runs one Jobcast worker:

- the same concurrency as the Jobcast worker it is compared with (``max_jobs``),
- a short poll (``poll_delay`` 0.01 s; arq's default 0.5 s is measured separately, for pickup),
- JSON (orjson) instead of pickle as job serializer, as Jobcast uses,
- uvloop, as Jobcast's worker;
- otherwise arq's defaults: results kept (``keep_result`` 3600 s: arq's equivalent of the record
  Jobcast keeps), arq's own retry bookkeeping, health-check key.

Jobs are enqueued with arq's own ``ArqRedis.enqueue_job("noop")`` (see :func:`enqueue`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func


async def noop(ctx: dict[str, Any]) -> None:
    return None


def build_worker(redis_url: str, *, max_jobs: int, poll_delay: float) -> Worker:
    return Worker(
        functions=[func(noop, name="noop")],
        redis_settings=RedisSettings.from_dsn(redis_url),
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        log_results=False,
    )


async def pool(redis_url: str) -> ArqRedis:
    return await create_pool(
        RedisSettings.from_dsn(redis_url), job_serializer=orjson.dumps, job_deserializer=orjson.loads
    )


async def enqueue(redis: ArqRedis) -> str:
    job = await redis.enqueue_job("noop")
    assert job is not None
    return job.job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--max-jobs", type=int, default=10)
    parser.add_argument("--poll-delay", type=float, default=0.01)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import uvloop

    asyncio.set_event_loop(uvloop.new_event_loop())
    build_worker(args.redis_url, max_jobs=args.max_jobs, poll_delay=args.poll_delay).run()


if __name__ == "__main__":
    main()
