"""The worker's pickup: runs are claimed in one script call (``worker/lua/claim.lua``)."""

from __future__ import annotations

from importlib import resources

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.main import JobcastWorker
from jobcast.worker.models import Priority
from jobcast.worker.store import Store

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
