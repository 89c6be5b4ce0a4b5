"""Upgrading a Redis written before cells: ``jobcast migrate --redis`` moves it into cell 0's layout,
and nothing starts on it before that (``worker/relayout.py``)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from redis.asyncio import Redis

from jobcast.worker import jobstats, schema
from jobcast.worker.clock import now
from jobcast.worker.ids import new_job_id
from jobcast.worker.relayout import OldLayout, refuse_old_layout
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .conftest import process_env, running_worker, wait_until

NO_PROGRESS = '{"percent":0.0,"eta":null}'


async def _old_job(redis: Redis, *, run: int, statuses: list[str]) -> str:
    """A queued job as the layout before 0.3 kept it (its history as one JSON array)."""
    at, ms = now()
    job_id = new_job_id(ms)
    history = [{"status": s, "at": at, "attempt": statuses[: i + 1].count("queued")} for i, s in enumerate(statuses)]
    await redis.hset(  # type: ignore[misc]
        f"jobcast:job:{job_id}",
        mapping={
            "id": job_id, "tenant": "acme", "type": "sleep", "status": "queued", "priority": "normal",
            "attempt": history[-1]["attempt"], "max_attempts": 3, "run": run, "params": '{"seconds": 0}',
            "webhook": "", "progress": NO_PROGRESS, "percent": 0, "created_at": at, "updated_at": at,
            "history": orjson.dumps(history).decode(), "version": len(statuses), "ready_ms": ms,
        },
    )  # fmt: skip
    data = orjson.dumps({"job_id": job_id, "type": "sleep", "status": "queued"}).decode()
    await redis.xadd(f"jobcast:log:job:{job_id}", {"event": "job.queued", "data": data})
    await redis.xadd("jobcast:log:tenant:acme", {"event": "job.queued", "job": job_id, "data": data})
    for index in ("jobcast:jobs:acme", "jobcast:jobs:acme:status:queued", "jobcast:jobs:acme:type:sleep"):
        await redis.zadd(index, {job_id: 0})
    await redis.incr("jobcast:queued-count")
    return job_id


async def test_migrate_moves_an_old_redis_into_cell_0_and_its_jobs_run_on(redis: Redis, settings: Settings) -> None:
    waiting = await _old_job(redis, run=1, statuses=["queued"])
    payload = {"t": 1, "f": schema.ARQ_FUNCTION, "a": [waiting, 1], "k": {}, "et": now()[1]}
    await redis.set(f"arq:job:{waiting}.1", orjson.dumps(payload))
    await redis.zadd("arq:queue", {f"{waiting}.1": now()[1] - 2e12})
    retried = await _old_job(redis, run=2, statuses=["queued", "processing", "queued"])
    await redis.zadd("jobcast:scheduled", {f"{retried}.2": now()[1]})  # its retry is due
    await redis.hset("jobcast:stats", mapping={"submitted|sleep": 2, "queued|normal": 2, "events": 4})  # type: ignore[misc]
    await redis.set(schema.CELL_INDEX, "0")  # a new version's start wrote it before it refused to go on

    with pytest.raises(OldLayout, match="jobcast migrate --redis"):
        await refuse_old_layout(redis)
    env = process_env(settings)
    first = subprocess.run([sys.executable, "-m", "jobcast", "migrate", "--redis"], env=env, capture_output=True)
    assert first.returncode == 0, first.stderr.decode()
    assert "Moved 13 keys into cell 0's layout" in first.stdout.decode()
    again = subprocess.run([sys.executable, "-m", "jobcast", "migrate", "--redis"], env=env, capture_output=True)
    assert again.returncode == 0 and "Nothing to move" in again.stdout.decode(), again.stderr.decode()
    await refuse_old_layout(redis)
    moved = set(await redis.keys("*")) - {schema.CELL_INDEX}
    assert all(key.startswith(("jobcast:{c0}:", "arq:job:{c0}")) for key in moved)
    assert await redis.get(schema.CELL_INDEX) == "0"  # untagged on purpose: never moved
    assert await redis.zrange(schema.ARQ_QUEUE, 0, -1) == [schema.arq_run_id(waiting, 1)]
    assert await redis.zrange(schema.SCHEDULED, 0, -1) == [schema.arq_run_id(retried, 2)]

    store = Store(redis, settings)
    async with running_worker(settings):

        async def both_completed() -> bool:
            records = [await store.get(job_id) for job_id in (waiting, retried)]
            return all(r is not None and r.status == "completed" for r in records)

        await wait_until(both_completed, timeout=20)
    record = await store.get(retried)
    assert record is not None
    assert [(h["status"], h["attempt"]) for h in record.history] == [
        ("queued", 1), ("processing", 1), ("queued", 2), ("processing", 2), ("completed", 2)
    ]  # fmt: skip
    series = jobstats.series(await redis.hgetall(schema.STATS))  # type: ignore[misc]
    assert (series["submitted|sleep"], series["queued|normal"], series["completed|sleep"]) == ("2", "0", "2")
    assert await redis.get(schema.QUEUED_COUNT) == "0"


async def test_migrate_leaves_a_key_whose_new_name_is_taken_and_says_so(redis: Redis, settings: Settings) -> None:
    await redis.hset("jobcast:apikeys", "k1", "old")  # type: ignore[misc]
    await redis.hset(schema.API_KEYS, "k2", "new")  # type: ignore[misc]
    moved = subprocess.run(
        [sys.executable, "-m", "jobcast", "migrate", "--redis"], env=process_env(settings), capture_output=True
    )
    assert moved.returncode != 0
    assert f"jobcast:apikeys (its new name {schema.API_KEYS} is taken)" in moved.stderr.decode()
    assert await redis.hgetall(schema.API_KEYS) == {"k2": "new"}  # never overwritten  # type: ignore[misc]
    assert await redis.hgetall("jobcast:apikeys") == {"k1": "old"}  # type: ignore[misc]
