"""The worker's pickup: runs are claimed in one script call (``worker/lua/claim.lua``)."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.main import JobcastWorker
from jobcast.worker.models import Priority
from jobcast.worker.store import Store

from .children import spawn
from .conftest import wait_until

CLAIM = resources.files("worker").joinpath("lua/claim.lua").read_text()
NOW_MS = 10**13


async def test_claim_takes_each_due_queued_run_once_up_to_the_limit(redis: Redis) -> None:
    claim = redis.register_script(CLAIM)
    await redis.zadd(schema.ARQ_QUEUE, {"a.1": 1, "b.1": 2, "c.1": 3, "d.1": 4, "later.1": NOW_MS + 1})
    await redis.set(in_progress_key_prefix + "b.1", "1")  # another worker runs it
    ids = ["a.1", "b.1", "gone.1", "c.1", "d.1", "later.1"]

    def args(limit: int) -> list[str | int]:
        return [in_progress_key_prefix, NOW_MS, 60_000, limit, *ids]

    first = await claim(keys=[schema.ARQ_QUEUE], args=args(2))
    assert first[::2] == ["a.1", "c.1"]
    assert [float(score) for score in first[1::2]] == [1.0, 3.0]
    assert await claim(keys=[schema.ARQ_QUEUE], args=args(10)) == ["d.1", "4"]
    assert await claim(keys=[schema.ARQ_QUEUE], args=args(10)) == []  # held, gone, or not due
    assert 0 < await redis.pttl(in_progress_key_prefix + "a.1") <= 60_000


async def test_a_worker_with_running_jobs_keeps_starting_queued_ones(store: Store, worker: JobcastWorker) -> None:
    async def create(job_type: str, params: dict[str, object]) -> str:
        created = await store.create(
            tenant="acme", job_type=job_type, params=params, priority=Priority.NORMAL, max_attempts=1
        )
        assert created.job_id is not None
        return created.job_id

    async def statuses(ids: list[str]) -> set[str]:
        return {record.status.value for i in ids if (record := await store.get(i)) is not None}

    async def all_in(ids: list[str], status: str) -> bool:
        return await statuses(ids) == {status}

    long = [await create("fragile", {"seconds": 60}) for _ in range(worker.max_jobs // 2)]
    await wait_until(lambda: all_in(long, "processing"))
    quick = [await create("sleep", {"seconds": 0, "steps": 1}) for _ in range(3)]
    await wait_until(lambda: all_in(quick, "completed"), timeout=5)
    assert await statuses(long) == {"processing"}


COLLECTOR_PROBE = """
import gc
from jobcast.worker import collector

collector.tune()
frozen = gc.get_freeze_count()
before = gc.get_stats()[0]["collections"]
kept = [[n] for n in range(20_000)]  # 20,000 container allocations: ~28 young collections by default
print(frozen, gc.get_stats()[0]["collections"] - before)
"""


def test_the_collector_is_tuned_for_long_running_processes() -> None:
    """What ``jobcast web`` and ``jobcast worker`` do once started (``jobcast.worker.collector``): the
    start-up's objects frozen, and no young collection in 20,000 allocations (the default collects
    every 700). A process of its own: the suite's collector is left as it is."""
    probe = spawn([sys.executable, "-c", COLLECTOR_PROBE], stdout=subprocess.PIPE, text=True)
    out, _ = probe.communicate(timeout=60)
    assert probe.returncode == 0
    frozen, collections = (int(n) for n in out.split())
    assert frozen > 1000
    assert collections == 0
