"""A job's life end to end: real uvicorn, real arq worker, real Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from jobcast.worker import doorbell, schema
from jobcast.worker.main import JobcastWorker
from jobcast.worker.settings import Settings

from .conftest import running_worker, submit, wait_for_status, wait_until


async def log_events(redis: Redis, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    entries = await redis.xrange(schema.job_log_key(job_id))
    return [(f["event"], orjson.loads(f["data"])) for _, f in entries]


async def test_submit_run_complete_with_progress_and_history(
    client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis
) -> None:
    response = await client.post("/jobs", json={"type": "sleep", "params": {"seconds": 0.3, "steps": 3}})
    assert response.status_code == 202
    assert response.headers["location"] == f"/jobs/{response.json()['id']}"
    assert int(response.headers["retry-after"]) >= 1
    ticket = response.json()
    assert ticket["status"] in ("queued", "processing")
    assert ticket["token"].startswith("jc1.")

    job = await wait_for_status(client, ticket["id"], "completed")
    assert job["result"] == {"slept": 0.3}
    assert job["progress"]["percent"] == 100.0
    assert [h["status"] for h in job["history"]] == ["queued", "processing", "completed"]
    times = [h["at"] for h in job["history"]]
    assert times == sorted(times)
    assert job["started_at"] == times[1] and job["finished_at"] == times[2]
    assert job["created_at"] == times[0]

    events = await log_events(redis, ticket["id"])
    names = [name for name, _ in events]
    assert names[0] == "job.queued" and names[1] == "job.processing" and names[-1] == "job.completed"
    percents = [data["progress"]["percent"] for name, data in events if name == "job.progress"]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert events[-1][1]["result"] == {"slept": 0.3}
    assert all(data["job_id"] == ticket["id"] and data["type"] == "sleep" for _, data in events)


async def test_retryable_failures_retry_with_backoff_then_succeed(
    client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis
) -> None:
    ticket = await submit(client, params={"seconds": 0, "steps": 1, "fail_times": 2})
    job = await wait_for_status(client, ticket["id"], "completed", timeout=20)
    assert job["attempt"] == 3
    statuses = [(h["status"], h["attempt"]) for h in job["history"]]
    assert statuses == [
        ("queued", 1), ("processing", 1),
        ("queued", 2), ("processing", 2),
        ("queued", 3), ("processing", 3),
        ("completed", 3),
    ]  # fmt: skip
    # A completed job has no error (docs/API.md: error is for failed jobs); each retry was announced
    # with the error of the attempt that failed.
    assert job["error"] is None
    retrying = [data for name, data in await log_events(redis, ticket["id"]) if name == "job.retrying"]
    assert [r["error"]["attempt"] for r in retrying] == [1, 2]
    assert all(r["error"]["retryable"] is True and r["retry_in_s"] > 0 for r in retrying)


async def test_exhausted_retries_fail_with_the_error_kept(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, params={"seconds": 0, "steps": 1, "fail_times": 5})
    job = await wait_for_status(client, ticket["id"], "failed", timeout=20)
    assert job["attempt"] == 3 == job["max_attempts"]
    assert job["error"] == {
        "type": "RetryableError",
        "message": "attempt 3 failed on purpose (params.fail_times=5)",
        "retryable": True,
        "attempt": 3,
    }


async def test_permanent_failure_is_not_retried(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, params={"fail": True})
    job = await wait_for_status(client, ticket["id"], "failed")
    assert job["attempt"] == 1
    assert job["error"]["retryable"] is False and job["error"]["type"] == "PermanentError"
    assert [h["status"] for h in job["history"]] == ["queued", "processing", "failed"]


async def test_plain_exceptions_are_retried_then_failed(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, "crash")
    job = await wait_for_status(client, ticket["id"], "failed")
    assert job["attempt"] == 3
    assert job["error"] == {"type": "ZeroDivisionError", "message": "boom", "retryable": True, "attempt": 3}


async def test_timeout_per_type_fails_the_attempt(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, "too_slow")
    job = await wait_for_status(client, ticket["id"], "failed")
    assert job["attempt"] == 2
    assert job["error"]["type"] == "TimeoutError"
    assert "0.3 s timeout" in job["error"]["message"]
    assert job["error"]["retryable"] is True


async def test_unserialisable_result_fails_without_retry(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, "unserialisable")
    job = await wait_for_status(client, ticket["id"], "failed")
    assert job["attempt"] == 1 and job["error"]["retryable"] is False


async def test_progress_is_coalesced_and_the_final_100_lands(
    client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis, settings: Settings
) -> None:
    started = time.monotonic()
    ticket = await submit(client, "spin", params={"calls": 20_000})
    job = await wait_for_status(client, ticket["id"], "completed")
    elapsed = time.monotonic() - started
    progress = [d for name, d in await log_events(redis, ticket["id"]) if name == "job.progress"]
    # 20,000 calls; at most progress_rate writes a second (+1 for the first, +1 for the drain).
    assert 1 <= len(progress) <= settings.progress_rate * elapsed + 2
    assert progress[-1]["progress"] == {"percent": 100.0, "eta": None, "message": "call 20000"}
    assert job["progress"] == {"percent": 100.0, "eta": None, "message": "call 20000"}


async def test_large_results_travel_as_a_link_in_events(
    client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis
) -> None:
    ticket = await submit(client, "big_result", params={"size": 10_000})
    await wait_for_status(client, ticket["id"], "completed")
    name, data = (await log_events(redis, ticket["id"]))[-1]
    assert name == "job.completed"
    assert "result" not in data and data["result_url"] == f"/jobs/{ticket['id']}/result"
    result = await client.get(f"/jobs/{ticket['id']}/result")
    assert result.json() == {"text": "x" * 10_000}


async def test_cancel_a_queued_job(client: httpx.AsyncClient, redis: Redis) -> None:
    ticket = await submit(client, params={"seconds": 5})
    response = await client.post(f"/jobs/{ticket['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert await redis.zcard(schema.ARQ_QUEUE) == 0  # gone from the queue, nothing left to run
    again = await client.post(f"/jobs/{ticket['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"


async def test_cancel_a_running_job_stops_its_handler(
    client: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    # No heartbeat within the test's time: the cancellation can only arrive on the control channel.
    async with running_worker(settings.model_copy(update={"heartbeat_s": 3600.0})):
        ticket = await submit(client, params={"seconds": 30, "steps": 300})
        await wait_for_status(client, ticket["id"], "processing")
        response = await client.post(f"/jobs/{ticket['id']}/cancel")
        assert response.status_code == 202
        assert response.json()["status"] == "processing" and response.json()["cancel_requested"] is True
        job = await wait_for_status(client, ticket["id"], "cancelled", timeout=20)
        assert [h["status"] for h in job["history"]] == ["queued", "processing", "cancelled"]
        assert job["result"] is None
        # The worker is free again: it takes the next job.
        follow = await submit(client, params={"seconds": 0})
        await wait_for_status(client, follow["id"], "completed")


async def test_higher_priority_starts_first_under_a_backlog(
    client: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    ids: dict[str, list[str]] = {"low": [], "normal": [], "high": []}
    for priority in ("low", "normal", "high", "low", "normal", "high", "low", "normal", "high"):
        ticket = await submit(client, params={"seconds": 0.02, "steps": 1}, priority=priority)
        ids[priority].append(ticket["id"])
    async with running_worker(settings.model_copy(update={"worker_concurrency": 1})):
        jobs = {}
        for job_ids in ids.values():
            for job_id in job_ids:
                jobs[job_id] = await wait_for_status(client, job_id, "completed")
    order = sorted(jobs.values(), key=lambda j: j["started_at"])
    assert [j["priority"] for j in order] == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3
    # Within one priority: first come, first served.
    assert [j["id"] for j in order[:3]] == ids["high"]


async def test_an_idle_worker_is_woken_by_the_doorbell_not_its_fallback_poll(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No fallback poll within the test's time: only the doorbell can wake the idle worker.
    monkeypatch.setattr(doorbell, "IDLE_FALLBACK_S", 3600.0)
    async with running_worker(settings) as worker:
        await wait_until(lambda: _is_set(worker.idle))  # polled, found nothing, waits for the doorbell
        ticket = await submit(client, params={"seconds": 0})
        await wait_for_status(client, ticket["id"], "completed")


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()
