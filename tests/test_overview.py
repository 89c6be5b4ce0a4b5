"""``GET /events?overview=true``: the dashboard's live header, on the tenant feed itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from httpx_sse import ServerSentEvent, aconnect_sse

from jobcast.worker.main import JobcastWorker
from jobcast.worker.overview import WORKER_LIVE_S
from jobcast.worker.store import Store

from .conftest import GLOBEX, submit, wait_until


async def overviews(client: httpx.AsyncClient, **params: str) -> AsyncIterator[ServerSentEvent]:
    async with aconnect_sse(client, "GET", "/events", params=params) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            if sse.data:
                yield sse


async def next_overview(events: AsyncIterator[ServerSentEvent], until: Any = None) -> dict[str, Any]:
    """The next overview event (the first one for which ``until(data)`` holds, when given)."""
    async with asyncio.timeout(20):
        async for sse in events:
            if sse.event != "overview":
                continue
            data: dict[str, Any] = orjson.loads(sse.data)
            if until is None or until(data):
                return data
    raise AssertionError("the stream ended without the overview expected")


async def test_the_feed_opens_with_an_overview_and_sends_a_new_one_after_job_events(
    client: httpx.AsyncClient,
) -> None:
    await submit(client, params={"seconds": 30})
    events = overviews(client, overview="true")
    first = await next_overview(events)
    assert first["counts"] == {"queued": 1, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0}
    assert first["workers"] == 0
    assert first["queue_depth"] >= 1
    second = await submit(client, params={"seconds": 30})
    assert (await client.post(f"/jobs/{second['id']}/cancel")).status_code == 200
    later = await next_overview(events, until=lambda data: data["counts"]["cancelled"] == 1)
    assert later["counts"]["queued"] == 1
    await events.aclose()


async def test_overview_counts_only_the_tenant_s_own_jobs_and_sees_workers(
    client: httpx.AsyncClient, server: Any, worker: JobcastWorker, store: Store
) -> None:
    await wait_until(lambda: store.live_workers(WORKER_LIVE_S))  # its first heartbeat is written at its start
    await submit(client, params={"seconds": 0})
    async with httpx.AsyncClient(base_url=server.url, headers=GLOBEX) as globex:
        events = overviews(globex, overview="true")
        data = await next_overview(events)
        await events.aclose()
    assert sum(data["counts"].values()) == 0
    assert data["workers"] >= 1


async def test_overview_frames_carry_no_id(client: httpx.AsyncClient) -> None:
    """Not in the event log: a client's Last-Event-ID stays the last job event it saw."""
    async with asyncio.timeout(20), client.stream("GET", "/events", params={"overview": "true"}) as response:
        text = ""
        async for chunk in response.aiter_text():
            text += chunk
            if "event: overview" in text and text.endswith("\n\n"):
                break
    block = next(b for b in text.split("\n\n") if "event: overview" in b)
    assert [line.split(":")[0] for line in block.splitlines()] == ["event", "data"]


async def test_without_the_parameter_the_feed_has_job_events_only(client: httpx.AsyncClient) -> None:
    async with asyncio.timeout(20), aconnect_sse(client, "GET", "/events") as source:
        assert source.response.status_code == 200
        job = await submit(client, params={"seconds": 30})
        async for sse in source.aiter_sse():
            if sse.data:
                break
    assert sse.event == "job.queued" and orjson.loads(sse.data)["job_id"] == job["id"]
    refused = await client.get("/events", params={"overview": "yes"})
    assert refused.status_code == 400
    assert "must be true or false" in refused.json()["detail"]
