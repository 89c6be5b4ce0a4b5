"""A Redis paused longer than a lease (SIGSTOP, then SIGCONT): issue 15, "a pause longer than a
lease could retry a job as lost".

While Redis is stopped nobody can renew a lease, so every lease lapses; when it resumes, the worker
that runs the job is alive and must keep it: the job runs exactly once to its terminal state, with
one terminal event, and is not lost. The jobs wait on a gate (a file the test creates), so that
they are certainly still running when Redis resumes, and end when the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.models import JobError, JobStatus, Priority
from jobcast.worker.runner import LEASE_HEARTBEATS, Runner
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client
from jobcast.worker.types import load_registry

from .children import redis_process
from .conftest import make_settings, running_worker, wait_until


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    """A redis-server of this test's own: it is stopped and continued."""
    proc = redis_process(tmp_path / "redis")
    proc.start()
    try:
        yield proc
    finally:
        if proc.process is not None and proc.process.poll() is None:
            proc.process.send_signal(signal.SIGCONT)  # never leave it stopped
        proc.stop()


@pytest.fixture
async def paused_setup(own_redis: RedisProcess) -> AsyncIterator[tuple[Settings, Redis, Store]]:
    settings = make_settings(own_redis.url)
    redis = redis_client(settings)
    try:
        yield settings, redis, Store(redis, settings)
    finally:
        await redis.aclose()


async def _gated_job(store: Store, gate: Path) -> str:
    created = await store.create(
        tenant="acme", job_type="gated", params={"gate": str(gate)}, priority=Priority.NORMAL, max_attempts=3
    )
    assert created.job_id
    return created.job_id


async def _status(store: Store, job_id: str, status: JobStatus) -> bool:
    record = await store.get(job_id)
    return record is not None and record.status is status


async def _events(redis: Redis, job_id: str) -> list[str]:
    return [f["event"] for _, f in await redis.xrange(schema.job_log_key(job_id))]


async def _progressed(redis: Redis, job_id: str) -> bool:
    """The run started and its first progress is written (so the events below are in one order)."""
    return "job.progress" in await _events(redis, job_id)


async def _lease(redis: Redis, job_id: str) -> float:
    return float(await redis.zscore(schema.RUNNING, job_id) or 0)


async def _renewed_after(redis: Redis, job_id: str, after_ms: float) -> bool:
    return await _lease(redis, job_id) > after_ms


async def test_a_pause_longer_than_a_lease_neither_retries_nor_loses_the_running_job(
    own_redis: RedisProcess, paused_setup: tuple[Settings, Redis, Store], tmp_path: Path
) -> None:
    settings, redis, store = paused_setup
    gate = tmp_path / "gate"
    job_id = await _gated_job(store, gate)
    async with running_worker(settings):
        await wait_until(lambda: _progressed(redis, job_id))
        assert own_redis.process is not None
        own_redis.process.send_signal(signal.SIGSTOP)
        # Every lease the worker can have written before its calls blocked lapses: the last one
        # was sent at most a heartbeat after the stop, and runs a lease from then.
        stopped = time.time()
        lapsed = stopped + settings.heartbeat_s * (1 + LEASE_HEARTBEATS) + 0.5
        await asyncio.sleep(lapsed - time.time())  # the fault itself: time must pass while paused
        own_redis.process.send_signal(signal.SIGCONT)
        # Once the lease runs from after the pause, the worker's sweep that followed it is over.
        await wait_until(lambda: _renewed_after(redis, job_id, lapsed * 1000), timeout=30)
        assert await _status(store, job_id, JobStatus.PROCESSING)
        gate.touch()
        await wait_until(lambda: _status(store, job_id, JobStatus.COMPLETED), timeout=30)
    record = await store.get(job_id)
    assert record is not None and record.attempt == 1 and record.run == 1
    assert await _events(redis, job_id) == ["job.queued", "job.processing", "job.progress", "job.completed"]
    assert await redis.zcard(schema.RUNNING) == 0
    assert await redis.zcard(schema.ARQ_QUEUE) == 0


async def test_a_worker_never_reaps_its_own_live_run(
    paused_setup: tuple[Settings, Redis, Store], tmp_path: Path
) -> None:
    # What the pause above leaves, without the race of who comes first once Redis resumes (the
    # worker's heartbeat or its sweep): the lease of a run this worker is running has lapsed, and
    # its sweep reads the lapsed lease before any heartbeat renews it (heartbeats are slow here).
    settings, redis, store = paused_setup
    settings = settings.model_copy(update={"heartbeat_s": 60.0})
    gate = tmp_path / "gate"
    job_id = await _gated_job(store, gate)
    async with running_worker(settings):
        await wait_until(lambda: _progressed(redis, job_id))
        async with redis.monitor() as monitor:
            await redis.zadd(schema.RUNNING, {job_id: 0}, xx=True)  # the lease lapsed
            sweeps = 0
            async for command in monitor.listen():
                if command["command"].startswith(f"ZRANGEBYSCORE {schema.RUNNING} "):
                    sweeps += 1  # the second sweep's read: the first one is over
                    if sweeps == 2:
                        break
        assert await _run_started(store, job_id, 1)  # not retried
        gate.touch()
        await wait_until(lambda: _status(store, job_id, JobStatus.COMPLETED), timeout=30)
    record = await store.get(job_id)
    assert record is not None and record.attempt == 1 and record.run == 1
    assert await _events(redis, job_id) == ["job.queued", "job.processing", "job.progress", "job.completed"]


async def test_a_new_run_of_a_job_stops_the_stale_run_and_keeps_its_own_lease(
    paused_setup: tuple[Settings, Redis, Store], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The other worker of a pause: one whose sweep came first, after Redis resumed, retried this
    # worker's job as lost (its lease had lapsed), and this very worker claimed the new run while
    # the old one still ran. Played here with the lapsed lease and the other worker's reap.
    # Heartbeats are slow, so that none renews the lapsed lease before the reap: the test calls
    # the one it needs.
    settings, redis, store = paused_setup
    settings = settings.model_copy(update={"heartbeat_s": 60.0})
    gate = tmp_path / "gate"
    job_id = await _gated_job(store, gate)
    caplog.set_level(logging.INFO, logger="jobcast.worker.runner")
    async with running_worker(settings) as worker:
        await wait_until(lambda: _progressed(redis, job_id))
        await redis.zadd(schema.RUNNING, {job_id: 0}, xx=True)  # the lease lapsed
        error = JobError(type="WorkerLost", message="lease lapsed", retryable=True, attempt=1)
        assert await store.reap(job_id, error) == "queued"  # another worker's sweep
        await wait_until(lambda: _run_started(store, job_id, 2))  # this worker claimed run 2
        await wait_until(lambda: _logged(caplog, f"job {job_id} run 1: lease lost"))  # run 1 stopped
        claimed_lease = await _lease(redis, job_id)
        runner: Runner = worker.ctx["runner"]
        await runner.heartbeat_once()  # run 2's heartbeat: run 1's end did not take it away
        assert await _lease(redis, job_id) > claimed_lease
        gate.touch()
        await wait_until(lambda: _status(store, job_id, JobStatus.COMPLETED), timeout=30)
    record = await store.get(job_id)
    assert record is not None and record.attempt == 2 and record.run == 2
    assert await _events(redis, job_id) == [
        "job.queued", "job.processing", "job.progress", "job.retrying", "job.processing", "job.progress",
        "job.completed",
    ]  # fmt: skip


async def test_a_sweep_reaps_the_lapsed_newer_run_of_a_job_whose_stale_run_it_still_runs(
    paused_setup: tuple[Settings, Redis, Store], tmp_path: Path
) -> None:
    # The other side of the test above: this worker still runs run 1 (stale: another worker retried
    # the job after a pause and took run 2), and run 2's lease lapsed (that worker died). The lease
    # is the job's, and now run 2's: this worker's sweep must reap it, not take it for its own run's.
    # In-process runner, no heartbeat loop: run 1 is not told it is stale before the sweep.
    settings, redis, store = paused_setup
    gate = tmp_path / "gate"
    job_id = await _gated_job(store, gate)
    runner = Runner(store, load_registry(settings), settings)
    [(_, first)] = await runner.claim([schema.arq_run_id(job_id, 1)], 1)
    stale = asyncio.create_task(first)
    try:
        await wait_until(lambda: _progressed(redis, job_id))
        await redis.zadd(schema.RUNNING, {job_id: 0}, xx=True)  # run 1's lease lapsed (a pause)
        error = JobError(type="WorkerLost", message="lease lapsed", retryable=True, attempt=1)
        assert await store.reap(job_id, error) == "queued"  # another worker's sweep
        [second] = await store.claim([schema.arq_run_id(job_id, 2)], 0, 1)  # taken there; that worker died
        assert (second.run, runner.running[job_id].run) == (2, 1)
        await runner.maintain_once()
        record = await store.get(job_id)
        assert record is not None and (record.status, record.run, record.attempt) == (JobStatus.QUEUED, 3, 3)
        assert record.error is not None and (record.error["type"], record.error["attempt"]) == ("WorkerLost", 2)
        await runner.heartbeat_once()  # run 1 learns it is stale and stops, writing nothing
        await stale
    finally:
        stale.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stale
    record = await store.get(job_id)
    assert record is not None and (record.status, record.run) == (JobStatus.QUEUED, 3)


async def _run_started(store: Store, job_id: str, run: int) -> bool:
    record = await store.get(job_id)
    return record is not None and record.status is JobStatus.PROCESSING and record.run == run


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)
