"""Webhook delivery throughput, and what the per-destination admission costs (issue 17).

    .venv/bin/python bench/deliveries.py --deliveries 2000            # this checkout
    /tmp/ref/bin/python bench/deliveries.py --deliveries 2000         # a reference install (e.g. main)

N deliveries (one per job, event ``job.queued``, written with ``Store.create``) to one receiver on
127.0.0.1, made by one delivery worker (``JOBCAST_WEBHOOK_CONCURRENCY=20``) in this process against
a private redis-server. The rate is set out of the way (``1000000/1``) and the destination cap to the
worker's 20 slots, so what is measured is the cost of the admission step itself (one more script
call per attempt, its slot bookkeeping), not the limits. Prints one JSON line: deliveries per second
from the worker's start to the last request received, and Redis round trips per delivery
(``total_reads_processed``). Run this checkout and the reference alternately, several rounds each,
and compare medians: the ratio is the figure, not the absolute numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from typing import Any

from arq.connections import RedisSettings, create_pool

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.delivery import DeliveryWorker
from jobcast.worker.models import Priority
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client
from tests.receiver import Receiver


async def redis_cpu(redis: Any) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def run(count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        redis_process = RedisProcess(Path(tmp))
        redis_process.start()
        receiver = await Receiver().start()
        try:
            settings = Settings(
                env="development",
                redis_url=redis_process.url,
                webhook_allow_private=True,
                webhook_rate="1000000/1",
                webhook_destination_concurrency=20,
                log_level="WARNING",
            )
            redis = redis_client(settings)
            store = Store(redis, settings)
            for _ in range(count):
                await store.create(
                    tenant="bench",
                    job_type="sleep",
                    params={},
                    priority=Priority.NORMAL,
                    max_attempts=1,
                    webhook={"url": receiver.url, "events": ["job.queued"]},
                )
            reads_before = int((await redis.info("stats"))["total_reads_processed"])
            redis_cpu_before = await redis_cpu(redis)
            cpu_before = time.process_time()
            pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            worker = DeliveryWorker(settings, redis=redis, pool=pool)
            started = time.monotonic()
            task = asyncio.create_task(worker.async_run())
            await receiver.wait_for(count, timeout=600)
            elapsed = receiver.requests[-1].at - started
            cpu = time.process_time() - cpu_before
            # Let the last outcomes be recorded before counting round trips.
            await asyncio.sleep(0.5)
            reads = int((await redis.info("stats"))["total_reads_processed"]) - reads_before
            redis_cpu_s = await redis_cpu(redis) - redis_cpu_before
            await worker.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pool.aclose()
            await redis.aclose()
            return {
                "deliveries": count,
                "per_s": round(count / elapsed, 1),
                "round_trips": round(reads / count, 2),
                # CPU of this process (worker and receiver together) and of redis-server, per delivery:
                # steadier than wall time on a shared machine.
                "cpu_ms": round(cpu * 1000 / count, 3),
                "redis_cpu_ms": round(redis_cpu_s * 1000 / count, 3),
            }
        finally:
            await receiver.stop()
            redis_process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.deliveries))))


if __name__ == "__main__":
    main()
