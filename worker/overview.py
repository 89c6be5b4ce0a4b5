"""A tenant's overview, as the dashboard's live header shows it: its jobs by status, the workers
alive, and the depth of the queue — read in one pipelined round trip.

Counts come from the tenant's status indexes (``ZCARD``), so they are exact for live jobs; a
finished job whose record has expired (``JOBCAST_RETENTION_S``) is counted until a listing of the
tenant's jobs drops its index entry. The queue depth is the service's, not the tenant's: jobs
waiting for a worker (retries waiting for their backoff and jobs parked under a tenant's
concurrency limit included), which is what tells a user whether their next job will wait. It is a
number only: no other tenant's job is named.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from . import schema
from .models import JobStatus

#: A worker is alive when it sent a heartbeat this recently (as ``/readyz`` and ``/metrics`` count).
WORKER_LIVE_S = 30.0


@dataclass(frozen=True, slots=True)
class Overview:
    counts: dict[JobStatus, int]
    workers: int
    queue_depth: int


async def read_overview(redis: Redis, tenant: str, *, cell: int = 0) -> Overview:
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for status in JobStatus:
            pipe.zcard(schema.index_key(tenant, status=status.value, cell=cell))
        pipe.zcount(schema.in_cell(schema.WORKERS, cell), now_ms - int(WORKER_LIVE_S * 1000), "+inf")
        pipe.get(schema.in_cell(schema.QUEUED_COUNT, cell))
        replies = await pipe.execute()
    *counts, workers, queued = replies
    return Overview(
        counts={status: int(n) for status, n in zip(JobStatus, counts, strict=True)},
        workers=int(workers),
        queue_depth=max(0, int(queued or 0)),
    )
