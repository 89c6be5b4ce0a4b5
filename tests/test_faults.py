"""Workers that die or are stopped mid-job: real worker processes, real signals."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import doorbell, schema
from jobcast.worker.runner import LEASE_HEARTBEATS
from jobcast.worker.settings import Settings

from .conftest import make_settings, running_worker, submit, subscribed, wait_for_status, wait_until


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


async def test_a_worker_whose_redis_connections_are_killed_finishes_its_job_and_hears_the_doorbell(
    client: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No fallback poll within the test's time: only a doorbell listener that subscribed again can
    # wake the idle worker for the second job.
    monkeypatch.setattr(doorbell, "IDLE_FALLBACK_S", 3600.0)
    async with running_worker(settings) as worker:
        ticket = await submit(client, params={"seconds": 1.5, "steps": 3})
        await wait_for_status(client, ticket["id"], "processing", timeout=20)
        # Every connection but the test's own, as a Redis restart or a proxy failover drops them:
        # the worker's, arq's, its doorbell listener's and the server's.
        killed = await redis.client_kill_filter(_type="normal", skipme=True)
        killed += await redis.client_kill_filter(_type="pubsub", skipme=True)
        assert killed >= 3
        job = await wait_for_status(client, ticket["id"], "completed", timeout=30)
        await wait_until(lambda: _logged(caplog, "doorbell connection lost"))  # the listener was among them
        await wait_until(lambda: subscribed(redis, schema.DOORBELL_CHANNEL))
        await wait_until(lambda: _is_set(worker.idle))
        second = await submit(client, params={"seconds": 0})
        await wait_for_status(client, second["id"], "completed", timeout=30)
    # Once, on its first attempt: the job's lease and outcome survived the dropped connections.
    assert job["attempt"] == 1 and [h["status"] for h in job["history"]] == ["queued", "processing", "completed"]
    assert await redis.zcard(schema.RUNNING) == 0


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_a_run_whose_start_fails_stays_queued_for_a_retry(
    client: httpx.AsyncClient, redis_server: RedisProcess, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A real fault, aimed at the start: the worker connects as a Redis user (ACL) that may use every
    # key but the tenant's job indexes, so arq's claim of the run succeeds and the state machine's
    # start is refused by Redis itself part-way (the record, which the call declares, is readable;
    # the index, which the script finds from the record, is not). Once it has been refused, the
    # user gets every key: arq must still hold the run and run it again. (Connection faults cannot
    # be aimed this way: arq's claim writes one round trip before the start, so a paused Redis
    # holds the claim first, and a connection killed while idle is replaced by the pool when it is
    # next checked out.)
    ticket = await submit(client, params={"seconds": 0})
    cell = schema.PREFIX  # indexes: jobcast:{c0}:jobs:<tenant>...; untagged: jobcast:cell, the old layout's
    every_key_but_the_indexes = ["arq:*", "jobcast:[^{]*", f"{cell}[^j]*", f"{cell}job:*"]
    await redis.acl_setuser(
        WORKER_USER, reset=True, enabled=True, passwords=[f"+{WORKER_PASSWORD}"], categories=["+@all"],
        channels=["*"], keys=every_key_but_the_indexes,
    )  # fmt: skip
    await redis.acl_log_reset()
    url = redis_server.url.replace("redis://", f"redis://{WORKER_USER}:{WORKER_PASSWORD}@", 1)
    try:
        async with running_worker(make_settings(url)):
            refusals = await wait_until(lambda: _acl_refusals(redis))
            await redis.acl_setuser(WORKER_USER, enabled=True, keys=["*"])
            job = await wait_for_status(client, ticket["id"], "completed", timeout=15)
    finally:
        await redis.acl_deluser(WORKER_USER)
    assert {(r["username"], r["reason"], r["context"], r["object"]) for r in refusals} == {
        (WORKER_USER, "key", "lua", schema.index_key("acme", status="queued"))  # the client is acme's
    }
    failed_starts = [r.getMessage() for r in caplog.records if "start failed" in r.getMessage()]
    assert failed_starts and all(ticket["id"] in m and "can't access" in m for m in failed_starts), failed_starts
    assert job["attempt"] == 1 and [h["status"] for h in job["history"]] == ["queued", "processing", "completed"]
    assert await redis.get(schema.QUEUED_COUNT) == "0"


WORKER_USER = "jobcast-test-worker"
WORKER_PASSWORD = "worker-password-0123456789"


async def _acl_refusals(redis: Redis) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = await redis.acl_log()
    return entries
