"""Workers that die or are stopped mid-job: real worker processes, real signals."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from jobcast.worker import schema
from jobcast.worker.runner import LEASE_HEARTBEATS
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .conftest import running_worker, submit, wait_for_status, wait_until


async def _said(proc: Any, text: str) -> bool:
    return text in proc.output()


def test_default_settings_notice_a_dead_worker_within_30_seconds() -> None:
    defaults = Settings(env="development")
    lease = defaults.heartbeat_s * LEASE_HEARTBEATS
    assert lease + defaults.maintenance_s < 30


async def test_a_sigkilled_worker_s_job_is_retried_on_another_worker(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any, redis: Redis
) -> None:
    doomed = worker_processes()
    ticket = await submit(client, params={"seconds": 1.5, "steps": 3})
    await wait_for_status(client, ticket["id"], "processing", timeout=20)
    doomed.signal(signal.SIGKILL)
    async with running_worker(settings):  # noticed once the lease lapses (how soon: the first test)
        job = await wait_for_status(client, ticket["id"], "completed", timeout=60)
    assert job["attempt"] == 2
    assert [(h["status"], h["attempt"]) for h in job["history"]] == [
        ("queued", 1), ("processing", 1), ("queued", 2), ("processing", 2), ("completed", 2),
    ]  # fmt: skip
    retrying = [
        orjson.loads(f["data"])
        for _, f in await redis.xrange(schema.job_log_key(ticket["id"]))
        if f["event"] == "job.retrying"
    ]
    assert len(retrying) == 1 and retrying[0]["error"]["type"] == "WorkerLost"
    assert await redis.zcard(schema.RUNNING) == 0


async def test_a_sigkilled_worker_s_job_fails_with_a_reason_after_its_last_attempt(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any
) -> None:
    doomed = worker_processes()
    ticket = await submit(client, "fragile", params={"seconds": 60})
    await wait_for_status(client, ticket["id"], "processing", timeout=20)
    doomed.signal(signal.SIGKILL)
    async with running_worker(settings):  # any live worker's sweep notices the lapsed lease
        job = await wait_for_status(client, ticket["id"], "failed", timeout=15)
    assert job["error"]["type"] == "WorkerLost"
    assert job["error"]["attempt"] == 1 and job["error"]["retryable"] is True
    assert "lease" in job["error"]["message"]


async def test_sigterm_lets_running_jobs_finish_and_takes_no_new_ones(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any
) -> None:
    proc = worker_processes()
    running = await submit(client, params={"seconds": 0.8, "steps": 2})
    await wait_for_status(client, running["id"], "processing", timeout=20)
    proc.signal(signal.SIGTERM)
    await wait_until(lambda: _said(proc, "taking no new jobs"))
    late = await submit(client, params={"seconds": 0})
    assert proc.wait(timeout=settings.shutdown_grace_s + 5) == 0, proc.output()
    assert (await wait_for_status(client, running["id"], "completed", timeout=5))["attempt"] == 1
    still = await client.get(f"/jobs/{late['id']}")
    assert still.json()["status"] == "queued"


async def test_sigterm_hands_back_a_job_that_outlives_the_grace_period(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any
) -> None:
    proc = worker_processes()
    ticket = await submit(client, params={"seconds": 30, "steps": 30})
    await wait_for_status(client, ticket["id"], "processing", timeout=20)
    proc.signal(signal.SIGTERM)
    # Bounded well short of the job's 30 s: a worker that waited for the job instead of handing it
    # back after its grace would not have exited yet (and the job would read completed below).
    assert proc.wait(timeout=settings.shutdown_grace_s + 20) == 0, proc.output()
    job = (await client.get(f"/jobs/{ticket['id']}")).json()
    assert job["status"] == "queued"
    # Handed back, not failed: the same attempt runs again on the next worker.
    assert [(h["status"], h["attempt"]) for h in job["history"]] == [
        ("queued", 1), ("processing", 1), ("queued", 1),
    ]  # fmt: skip
    assert job["error"] is None


async def test_a_run_whose_start_fails_stays_queued_for_a_retry(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, redis: Redis
) -> None:
    # Fault injection, on the real store and Redis: the first start of a run fails as it would
    # on a dropped connection. arq must keep the run on its queue and run it again.
    real_start = Store.start
    failures: list[str] = []

    async def start_failing_once(self: Store, job_id: str, run: int, lease_deadline_ms: int) -> Any:
        if not failures:
            failures.append(job_id)
            raise RedisConnectionError("connection lost (injected)")
        return await real_start(self, job_id, run, lease_deadline_ms)

    monkeypatch.setattr(Store, "start", start_failing_once)
    ticket = await submit(client, params={"seconds": 0})
    async with running_worker(settings):
        job = await wait_for_status(client, ticket["id"], "completed", timeout=15)
    assert failures == [ticket["id"]]
    assert job["attempt"] == 1 and [h["status"] for h in job["history"]] == ["queued", "processing", "completed"]
    assert await redis.get(schema.QUEUED_COUNT) == "0"
