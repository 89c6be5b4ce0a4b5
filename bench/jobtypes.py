"""Job types for the benchmarks only, loaded with ``JOBCAST_JOB_MODULES=bench.jobtypes`` (and the repo
root on ``PYTHONPATH``); :func:`bench.harness.jobcast_env` sets both.

- ``bench.noop``  does nothing: what the pipeline costs around a job.
- ``bench.nap``   sleeps, reporting progress: keeps a worker busy for the pickup benchmark.
- ``bench.tick``  reports progress on a schedule, with its own wall-clock time in the message
  (``bseq=<n> t=<ns>``), so a stream client can measure handler ``progress()`` -> client latency.
  It waits for the start time that the benchmark writes to :data:`TICK_START_KEY`, so that every
  stream is connected before the first tick.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel, Field

from jobcast import JobContext, job_type

TICK_START_KEY = "bench:tick:start"


class NoParams(BaseModel):
    pass


@job_type("bench.noop", params=NoParams, description="Does nothing.", timeout_s=60, max_attempts=1)
async def noop(ctx: JobContext, params: NoParams) -> None:
    return None


class NapParams(BaseModel):
    seconds: float = Field(default=1.0, ge=0, le=3600)


@job_type("bench.nap", params=NapParams, description="Sleeps, reporting progress 4 times a second.", timeout_s=3700)
async def nap(ctx: JobContext, params: NapParams) -> None:
    deadline = time.monotonic() + params.seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(0.25, left))
        ctx.progress(min(100.0, 100 * (1 - max(0.0, deadline - time.monotonic()) / max(params.seconds, 1e-9))))


class TickParams(BaseModel):
    events: int = Field(default=10, ge=1, le=10_000)
    interval_s: float = Field(default=1.0, gt=0)
    #: Seconds after the common start time of this job's first tick (spreads jobs over the interval).
    offset_s: float = Field(default=0.0, ge=0)


_start: asyncio.Future[float] | None = None


async def _start_time(ctx: JobContext) -> float:
    """The common start time (epoch seconds), read by one poller per worker process for all jobs."""
    global _start
    if _start is None:
        _start = asyncio.get_running_loop().create_future()
        future = _start

        async def poll() -> None:
            while (raw := await ctx.store.redis.get(TICK_START_KEY)) is None:
                await asyncio.sleep(0.1)
            future.set_result(float(raw))

        task = asyncio.create_task(poll())
        future.add_done_callback(lambda _: task.cancel())
    return await asyncio.shield(_start)


@job_type("bench.tick", params=TickParams, description="Reports timed progress on a schedule.", timeout_s=3700)
async def tick(ctx: JobContext, params: TickParams) -> dict[str, Any]:
    start = await _start_time(ctx) + params.offset_s
    for n in range(1, params.events + 1):
        due = start + (n - 1) * params.interval_s
        if (wait := due - time.time()) > 0:
            await asyncio.sleep(wait)
        ctx.progress(100 * n / params.events, message=f"bseq={n} t={time.time_ns()}")
    return {"events": params.events}
