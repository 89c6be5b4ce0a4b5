"""High availability per cell: a Sentinel-managed primary fails over under load (docs/API.md,
"Redis failover"; docs/design: what asynchronous replication can lose and how it is detected).

The Procfile's processes run against a ``redis+sentinel://`` URL; ``SENTINEL FAILOVER`` is forced
while jobs are submitted and their streams read. Every job that got a 202 must finish, every stream
must end at its job's terminal event (resuming with Last-Event-ID, or told to resync), and the
processes must move to the new primary by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import SSEError, aconnect_sse
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.connections import CellUrlError, arq_settings_for, follow_primary, parse_sentinel_url, redis_for
from jobcast.worker.store import Store

from .children import redis_process
from .conftest import ACME, ServerHandle, WebProcess, WorkerProcess, make_settings, serving, wait_until
from .sentinel import SentinelCell
from .test_sse import new_running_job
from .wsclient import ws_connect

TERMINAL = {"job.completed", "job.failed", "job.cancelled"}


@pytest.fixture
def cell(tmp_path: Path) -> Iterator[SentinelCell]:
    started = SentinelCell(tmp_path / "cell")
    try:
        started.start()
        yield started
    finally:
        started.stop()


def test_sentinel_urls_are_read_or_refused_with_the_part_to_fix() -> None:
    address = parse_sentinel_url("redis+sentinel://:s3cret@h1:26380,[::1]:26381,h3/cell0/2?replica_acks=2")
    assert address.sentinels == (("h1", 26380), ("::1", 26381), ("h3", 26379))
    assert (address.service, address.db, address.username, address.password) == ("cell0", 2, None, "s3cret")
    assert address.replica_acks == 2 and parse_sentinel_url("redis+sentinel://h1/cell0").replica_acks == 1
    assert "s3cret" not in repr(address)
    arq = arq_settings_for("redis+sentinel://u:p@h1:1,h2:2/cell0")
    assert (arq.sentinel, arq.sentinel_master, arq.host, arq.username, arq.password) == (
        True,
        "cell0",
        [("h1", 1), ("h2", 2)],
        "u",
        "p",
    )
    for bad, part in [
        ("redis+sentinel:///cell0", "names no sentinel"),
        ("redis+sentinel://h1:26379", "service name"),
        ("redis+sentinel://h1:26379/cell0/x", "must be a number"),
        ("redis+sentinel://h1:port/cell0", "is not host:port"),
        ("redis+sentinel://h1/cell0?master=x", "unknown query parameter"),
    ]:
        with pytest.raises(CellUrlError, match=part):
            parse_sentinel_url(bad)


async def follow(client: httpx.AsyncClient, job_id: str, resyncs: list[str]) -> list[str]:
    """Read a job's stream as EventSource does (reconnect with Last-Event-ID) to its terminal event;
    told to resync (410), start over without an id. The events read since the last resync."""
    last: str | None = None
    seen: list[str] = []
    while True:
        headers = {"Last-Event-ID": last} if last else {}
        try:
            async with aconnect_sse(client, "GET", f"/jobs/{job_id}/events", headers=headers) as source:
                status = source.response.status_code
                if status == 204:
                    return seen
                if status == 410:
                    resyncs.append(job_id)
                    last, seen = None, []
                    continue
                if status == 503:  # Redis unreachable for a moment: retry, as EventSource would
                    await asyncio.sleep(0.1)
                    continue
                assert status == 200, await source.response.aread()
                async for sse in source.aiter_sse():
                    if not sse.id:  # the retry: head
                        continue
                    last = sse.id
                    seen.append(sse.event)
                    if sse.event in TERMINAL:
                        return seen
        except (httpx.TransportError, SSEError):
            continue


async def test_a_forced_failover_under_load_loses_no_accepted_job_and_every_stream_ends(
    cell: SentinelCell, tmp_path: Path
) -> None:
    settings = make_settings(cell.url)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    web = WebProcess(settings, tmp_path / "web.log")
    try:
        await asyncio.to_thread(web.wait_ready)
        async with httpx.AsyncClient(base_url=web.url, headers=ACME, timeout=30) as client:
            accepted: list[str] = []
            followers: list[asyncio.Task[list[str]]] = []
            resyncs: list[str] = []
            switched, running = asyncio.Event(), asyncio.Event()
            after_switch = 0

            async def submit_until(enough: asyncio.Event) -> None:
                nonlocal after_switch
                while not enough.is_set():
                    body = {"type": "sleep", "params": {"seconds": 0.3, "steps": 3}}
                    try:
                        response = await client.post("/jobs", json=body)
                    except httpx.TransportError:
                        continue
                    if response.status_code == 503:  # the cell is switching: retried
                        continue
                    assert response.status_code == 202, response.text
                    job_id = response.json()["id"]
                    accepted.append(job_id)
                    followers.append(asyncio.create_task(follow(client, job_id, resyncs)))
                    if len(accepted) >= 10:
                        running.set()
                    if switched.is_set():
                        after_switch += 1
                        if after_switch >= 10:
                            enough.set()

            enough = asyncio.Event()
            async with asyncio.timeout(90):
                submitting = asyncio.create_task(submit_until(enough))
                # Jobs running and streams open on the old primary when it goes.
                await asyncio.wait([submitting, asyncio.create_task(running.wait())], return_when="FIRST_COMPLETED")
                assert not submitting.done(), submitting.result()
                old_port = cell.primary_port()
                new_port = await cell.failover()
                switched.set()
                await submitting
                _, pending = await asyncio.wait(followers, timeout=45)
                if pending:
                    stuck = [accepted[followers.index(task)] for task in pending]
                    jobs = [(await client.get(f"/jobs/{job_id}")).json() for job_id in stuck]
                    raise AssertionError(f"streams not ended: {jobs}")
                finals = [task.result() for task in followers]
                for job_id, events in zip(accepted, finals, strict=True):
                    job = await wait_terminal(client, job_id)
                    assert events and events[-1] == f"job.{job['status']}", (job_id, events, job)
            # The processes started before the failover moved by themselves: the jobs accepted after
            # it (a 202 needs a replica's confirmation, which the old primary no longer has) finished.
            assert worker.process.poll() is None and web.process.poll() is None
            assert new_port != old_port
    finally:
        web.close()
        worker.close()
    print(f"{len(accepted)} jobs, {after_switch} after the switch; {len(resyncs)} streams told to resync")


async def wait_terminal(client: httpx.AsyncClient, job_id: str) -> dict[str, object]:
    while True:
        response = await client.get(f"/jobs/{job_id}", params={"wait": "5"})
        assert response.status_code == 200, response.text
        job: dict[str, object] = response.json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job


async def test_a_client_from_redis_for_moves_to_the_new_primary_at_the_switch(cell: SentinelCell) -> None:
    """Without follow_primary the client's connection stays on the old primary (still a master for
    seconds, until Sentinel demotes it), and INFO through it names the old port."""
    client = redis_for(cell.url)
    follower = asyncio.create_task(follow_primary(cell.url, [client]))
    try:
        old = int((await client.info("server"))["tcp_port"])
        new = await cell.failover()
        assert old != new

        async def on_new() -> bool:
            return int((await client.info("server"))["tcp_port"]) == new

        await wait_until(on_new, timeout=5)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await client.aclose()


async def test_a_resume_from_an_event_the_new_primary_lost_is_told_to_resync(tmp_path: Path) -> None:
    """A real lost write: the replica is promoted, the old primary takes one more event (clients may
    have received it), then dies. Resuming from that event is a 410 that says to resync; resuming
    from an event the new primary has still works."""
    async with a_lost_event(tmp_path) as (replica, lost, kept):
        settings = make_settings(replica.url)
        new = Store(redis_for(replica.url), settings)
        async with serving(settings) as client, contextlib.aclosing(new.redis):
            for url, last in lost.items():
                response = await client.get(url, headers={"Last-Event-ID": last})
                assert response.status_code == 410, response.text
                assert response.headers["content-type"] == "application/problem+json"
                assert "Redis lost it when its primary changed" in response.json()["detail"]
            async with client.stream("GET", "/events", headers={"Last-Event-ID": kept["/events"]}) as feed:
                assert feed.status_code == 200
            job_url = next(url for url in kept if url != "/events")
            async with aconnect_sse(client, "GET", job_url, headers={"Last-Event-ID": kept[job_url]}) as source:
                assert source.response.status_code == 200
                await new.complete(job_url.split("/")[2], 1, "1")
                events = [sse.event async for sse in source.aiter_sse() if sse.id]
            assert events == ["job.completed"]


async def test_a_websocket_resume_from_an_event_the_new_primary_lost_is_told_to_resync(tmp_path: Path) -> None:
    """The same real lost write, resumed over ``GET /ws``: as on the SSE streams, a 410 error frame
    that says to resync; a resume from an event the new primary has is subscribed."""
    async with a_lost_event(tmp_path) as (replica, lost, kept):
        handle = ServerHandle(make_settings(replica.url))
        await handle.start()
        try:
            async with ws_connect(handle.url, ACME) as ws:
                for url, last in lost.items():
                    channel = _ws_channel(url)
                    refused = await ws.request({"op": "subscribe", "channel": channel, "last_event_id": last})
                    assert refused["op"] == "error" and refused["status"] == 410, refused
                    assert "Redis lost it when its primary changed" in refused["detail"]
                    assert "last_event_id" in refused["detail"]
                for url, last in kept.items():
                    assert (await ws.subscribe(_ws_channel(url), last_event_id=last))["op"] == "ok"
        finally:
            await handle.stop()


def _ws_channel(url: str) -> str:
    """The WebSocket channel of an SSE stream's path."""
    return "tenant" if url == "/events" else "job:" + url.split("/")[2]


@contextlib.asynccontextmanager
async def a_lost_event(tmp_path: Path) -> AsyncIterator[tuple[RedisProcess, dict[str, str], dict[str, str]]]:
    """A real lost write (:func:`_lose_an_event`): the new primary, and the last ids lost and kept;
    within 60 s, both Redis processes killed at the end."""
    primary, replica = redis_process(tmp_path / "p"), redis_process(tmp_path / "r")
    primary.start()
    replica.start()
    try:
        async with asyncio.timeout(60):
            lost, kept = await _lose_an_event(primary, replica)
            yield replica, lost, kept
    finally:
        replica.kill()
        primary.kill()


async def _lose_an_event(primary: RedisProcess, replica: RedisProcess) -> tuple[dict[str, str], dict[str, str]]:
    """Replicate a running job, promote the replica, write one more event on the old primary, kill
    it. The last ids of the job's stream and the tenant feed: after (lost), and before (kept)."""
    async with Redis(port=replica.port) as r:
        await r.replicaof("127.0.0.1", primary.port)
    old = Store(redis_for(primary.url), make_settings(primary.url))
    async with contextlib.aclosing(old.redis):
        job_id = await new_running_job(old)
        assert await old.redis.wait(1, 10_000) == 1  # the job and its first events are on the replica
        job_url = f"/jobs/{job_id}/events"

        async def tips() -> dict[str, str]:
            return {
                job_url: (await old.log_events("job", job_id))[-1].id,
                "/events": (await old.log_events("tenant", "acme"))[-1].id,
            }

        kept = await tips()
        # The failover: the replica is promoted while the old primary still takes writes (as it
        # does until the sentinels demote it, or every process has moved over).
        async with Redis(port=replica.port) as r:
            await r.replicaof("NO", "ONE")
        await old.progress(job_id, 1, 50.0, None, None)
        lost = await tips()
    primary.kill()
    return lost, kept
