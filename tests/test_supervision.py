"""Background tasks are supervised: a loop that dies of something unexpected is logged and run again
(or its owner stops), never left dead in silence. Faults are injected into the loops themselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from redis.asyncio import Redis

from jobcast.worker import doorbell, schema
from jobcast.worker.main import JobcastWorker, build_worker
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store
from jobcast.worker.supervision import supervise

from .conftest import ServerHandle, hub_of, running_worker, submit, subscribed, wait_for_status, wait_until
from .test_sse import new_running_job


class Bug(Exception):
    """What a loop did not expect."""


async def test_a_loop_that_raises_is_logged_and_run_again(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[str] = []
    again = asyncio.Event()

    async def first() -> None:
        runs.append("run")
        raise Bug("first run")

    async def rerun() -> None:
        runs.append("rerun")
        again.set()
        await asyncio.Event().wait()

    task = supervise("test-loop", first, rerun=rerun)
    async with asyncio.timeout(10):
        await again.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # cancellation, the owner's way to stop it, passes through
    assert runs == ["run", "rerun"]
    [record] = [r for r in caplog.records if r.name == "jobcast.worker.supervision"]
    assert record.levelno == logging.ERROR and "test-loop died: Bug('first run')" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is not None  # with its traceback


async def test_a_loop_that_cannot_be_run_again_stops_its_owner(caplog: pytest.LogCaptureFixture) -> None:
    deaths: list[BaseException] = []
    runs = 0

    async def doomed() -> None:
        nonlocal runs
        runs += 1
        raise Bug("fatal")

    await supervise("test-fatal", doomed, on_death=deaths.append)
    assert runs == 1 and [str(d) for d in deaths] == ["fatal"]
    assert any(r.levelno == logging.CRITICAL and "test-fatal died" in r.getMessage() for r in caplog.records)


async def test_the_hub_comes_back_after_a_bug_and_its_streams_miss_nothing(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = hub_of(server)
    job_id = await new_running_job(store)
    real_dispatch = hub.dispatch
    broken: list[str] = []

    def dispatch_failing_once(raws: list[str]) -> None:
        if not broken and any("job.progress" in raw for raw in raws):
            broken.extend(raws)
            raise Bug("a bug in the hub")  # not a Redis error: the hub's loop does not expect it
        real_dispatch(raws)

    monkeypatch.setattr(hub, "dispatch", dispatch_failing_once)
    seen: list[str] = []
    async with asyncio.timeout(30):
        async with aconnect_sse(client, "GET", f"/jobs/{job_id}/events") as source:
            events = source.aiter_sse()
            while len(seen) < 2:  # queued, processing: replayed from the log
                sse = await anext(events)
                if sse.data:
                    seen.append(sse.event)
            await store.progress(job_id, 1, 50, None, None)  # kills the hub's loop
            await wait_until(lambda: _true(broken))
            await wait_until(lambda: _true(hub.connected.is_set()))
            await store.complete(job_id, 1, "1")  # needs a live hub to reach the stream
            async for sse in events:
                if sse.data:
                    seen.append(sse.event)
    assert seen == ["job.queued", "job.processing", "job.progress", "job.completed"]


async def _true(value: Any) -> bool:
    return bool(value)


async def test_a_handler_that_raises_while_being_stopped_is_logged(
    client: httpx.AsyncClient, worker: JobcastWorker, caplog: pytest.LogCaptureFixture
) -> None:
    ticket = await submit(client, "messy_exit", params={"seconds": 60})
    job = await wait_for_status(client, ticket["id"], "failed")  # stopped at its timeout
    assert job["error"]["type"] == "TimeoutError"
    lines = [r for r in caplog.records if r.name == "jobcast.worker.runner" and "while being stopped" in r.getMessage()]
    assert [r.getMessage() for r in lines] == [
        f"job {ticket['id']}: handler raised CleanupFailed('cleanup failed while stopping') while being stopped"
    ]


async def test_the_doorbell_listener_comes_back_after_a_bug(
    client: httpx.AsyncClient, settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No fallback poll within the test's time: only the doorbell listener can wake the idle worker.
    monkeypatch.setattr(doorbell, "IDLE_FALLBACK_S", 3600.0)
    async with running_worker(settings) as worker:
        await wait_until(lambda: _true("runner" in worker.ctx))  # started up
        runner = worker.ctx["runner"]
        broken: list[str] = []

        def stop_job_failing(job_id: str, reason: str) -> None:
            broken.append(job_id)
            raise Bug("a bug in the listener")

        monkeypatch.setattr(runner, "stop_job", stop_job_failing)
        await wait_until(lambda: subscribed(redis, schema.CONTROL_CHANNEL))
        await redis.publish(schema.CONTROL_CHANNEL, "cancel job_nobody")  # kills the listener's loop
        await wait_until(lambda: _true(broken))
        await wait_until(lambda: _true(worker.idle.is_set()))
        ticket = await submit(client, params={"seconds": 0})
        await wait_for_status(client, ticket["id"], "completed")


async def test_a_worker_whose_delivery_loop_dies_stops_and_says_why(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    worker = build_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        await wait_until(lambda: _true(worker.deliveries is not None and worker.deliveries.idle.is_set()))
        assert worker.deliveries is not None

        async def poll_failing() -> None:
            raise Bug("a bug in the delivery loop")

        monkeypatch.setattr(worker.deliveries, "_poll_iteration", poll_failing)
        worker.deliveries.wake()
        async with asyncio.timeout(30):
            with contextlib.suppress(asyncio.CancelledError):
                await task  # the worker stops as on SIGTERM
        assert isinstance(worker.died, Bug)
        assert any("jobcast-webhooks died: Bug('a bug in the delivery loop')" in r.getMessage() for r in caplog.records)
    finally:
        await worker.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task
