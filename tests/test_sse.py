"""Server-Sent Events: exact replay, live delivery, endings, auth, slow consumers, scale-out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.models import Priority
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .children import child_pids
from .conftest import ACME, GLOBEX, ServerHandle, WebProcess, hub_of, make_settings, wait_until

Seen = list[tuple[str, str, dict[str, Any]]]
#: Streams of the reconnect-storm test.
STORM = 300


async def new_running_job(store: Store, tenant: str = "acme") -> str:
    created = await store.create(tenant=tenant, job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=3)
    assert created.job_id is not None
    assert await store.start(created.job_id, 1, 10**15) is not None
    return created.job_id


async def subscribed(server: ServerHandle, count: int, timeout: float = 20.0) -> None:
    """Wait until ``count`` streams (or long-polls) of ``server`` are subscribed to its hub."""
    hub = hub_of(server)

    async def enough() -> bool:
        return hub.subscriber_count >= count

    await wait_until(enough, timeout=timeout)


async def dispatched(events: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ServerSentEvent]:
    """What a browser's EventSource dispatches: blocks with data (a lone ``retry:`` or ``id:``
    only updates the connection's state)."""
    async for sse in events:
        if sse.data:
            yield sse


async def collect(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    until: int | None = None,
    timeout: float = 10.0,
) -> Seen:
    """Read a stream until it ends (or ``until`` events arrived); bounded by ``timeout``."""
    seen: Seen = []
    async with asyncio.timeout(timeout):
        async with aconnect_sse(client, "GET", url, headers=dict(headers or {}), params=params) as source:
            assert source.response.status_code == 200, await source.response.aread()
            async for sse in dispatched(source.aiter_sse()):
                seen.append((sse.id, sse.event, orjson.loads(sse.data)))
                if until is not None and len(seen) >= until:
                    break
    return seen


@contextlib.asynccontextmanager
async def live_feed(
    client: httpx.AsyncClient, timeout: float = 10.0
) -> AsyncIterator[Callable[[int], Awaitable[Seen]]]:
    """The tenant feed without a Last-Event-ID, once its response has come: it is live from the
    log's tip as read after its subscription, so everything published from then on is in it (not
    once merely subscribed: what is published before the tip is read is behind it). Yields reads
    of the next ``n`` events (``read(n)``)."""
    async with asyncio.timeout(timeout), aconnect_sse(client, "GET", "/events") as source:
        assert source.response.status_code == 200, await source.response.aread()
        events = dispatched(source.aiter_sse())

        async def read(n: int) -> Seen:
            return [(sse.id, sse.event, orjson.loads(sse.data)) for sse in [await anext(events) for _ in range(n)]]

        yield read


def ids(seen: Seen) -> list[str]:
    return [i for i, _, _ in seen]


def log_ids(entries: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [sid for sid, _ in entries]


async def test_a_late_subscriber_gets_the_whole_history_then_the_stream_ends(
    client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    job_id = await new_running_job(store)
    await store.progress(job_id, 1, 50, "half", None)
    await store.complete(job_id, 1, '{"ok": true}')
    seen = await collect(client, f"/jobs/{job_id}/events")
    assert [e for _, e, _ in seen] == ["job.queued", "job.processing", "job.progress", "job.completed"]
    assert ids(seen) == log_ids(await redis.xrange(schema.job_log_key(job_id)))
    assert seen[-1][2]["result"] == {"ok": True}
    assert seen[2][2]["progress"] == {"percent": 50.0, "eta": None, "step": "half"}


async def test_early_and_late_subscribers_see_the_same_sequence(
    client: httpx.AsyncClient, store: Store, server: ServerHandle
) -> None:
    job_id = await new_running_job(store)
    early = asyncio.create_task(collect(client, f"/jobs/{job_id}/events"))
    await subscribed(server, 1)
    for percent in (10, 20, 30, 40):
        await store.progress(job_id, 1, percent, None, None)
    await store.complete(job_id, 1, "1")
    late = await collect(client, f"/jobs/{job_id}/events")
    assert ids(await early) == ids(late)
    assert len(late) == 7


async def test_resuming_with_last_event_id_misses_and_repeats_nothing(client: httpx.AsyncClient, store: Store) -> None:
    job_id = await new_running_job(store)
    for percent in range(5, 55, 5):
        await store.progress(job_id, 1, percent, None, None)
    first = await collect(client, f"/jobs/{job_id}/events", until=6)
    # Events happen while the client is away.
    for percent in range(55, 100, 5):
        await store.progress(job_id, 1, percent, None, None)
    await store.complete(job_id, 1, "1")
    rest_header = await collect(client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": first[-1][0]})
    rest_query = await collect(client, f"/jobs/{job_id}/events", params={"last_event_id": first[-1][0]})
    everything = await collect(client, f"/jobs/{job_id}/events")
    assert ids(first) + ids(rest_header) == ids(everything)
    assert rest_query == rest_header
    # After the terminal event the stream is over: reconnecting answers 204.
    after_end = await client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": everything[-1][0]})
    assert after_end.status_code == 204


async def test_live_events_follow_the_replay_without_a_gap(client: httpx.AsyncClient, store: Store) -> None:
    job_id = await new_running_job(store)

    async def produce() -> None:
        for percent in range(1, 101):
            await store.progress(job_id, 1, percent, None, None)
            if percent % 10 == 0:
                await asyncio.sleep(0.01)
        await store.complete(job_id, 1, "1")

    producer = asyncio.create_task(produce())
    readers = [asyncio.create_task(collect(client, f"/jobs/{job_id}/events")) for _ in range(5)]
    await producer
    results = await asyncio.gather(*readers)
    expected = log_ids(await store.redis.xrange(schema.job_log_key(job_id)))
    assert len(expected) == 103
    for seen in results:
        assert ids(seen) == expected


async def test_five_hundred_streams_on_one_job_receive_the_identical_sequence(
    server: ServerHandle, store: Store
) -> None:
    job_id = await new_running_job(store)
    limits = httpx.Limits(max_connections=600, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, headers=ACME, limits=limits, timeout=60) as many:
        readers = [asyncio.create_task(collect(many, f"/jobs/{job_id}/events", timeout=60)) for _ in range(500)]
        await subscribed(server, 500, timeout=60)  # all connected: what follows is live delivery
        for percent in range(10, 101, 10):
            await store.progress(job_id, 1, percent, None, None)
        await store.complete(job_id, 1, "1")
        results = await asyncio.gather(*readers)
    expected = log_ids(await store.redis.xrange(schema.job_log_key(job_id)))
    assert all(ids(seen) == expected for seen in results)


async def test_a_stream_whose_last_event_the_log_lost_across_a_hub_reconnect_ends_and_is_told_to_resync(
    client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    """As a failover that lost the last event sent (docs/design/sentinel.md; the WebSocket's twin is
    in test_ws.py): the loss made by hand (XDEL), the reconnect by killing the hub's pub/sub
    connection. The stream ends rather than resume past the hole; its reconnect gets the 410."""
    job_id = await new_running_job(store)
    url = f"/jobs/{job_id}/events"
    async with asyncio.timeout(20), aconnect_sse(client, "GET", url) as source:
        events = dispatched(source.aiter_sse())
        sent = [await anext(events), await anext(events)]
        await redis.xdel(schema.job_log_key(job_id), sent[-1].id)
        assert await redis.client_kill_filter(_type="pubsub") >= 1
        assert [sse async for sse in events] == []  # ended, nothing more
    response = await client.get(url, headers={"Last-Event-ID": sent[-1].id})
    assert response.status_code == 410, response.text
    assert "Redis lost it when its primary changed" in response.json()["detail"]


async def test_the_tenant_feed_carries_only_the_tenant_s_jobs_and_resumes(
    client: httpx.AsyncClient, store: Store
) -> None:
    async with live_feed(client) as read:
        a = await new_running_job(store, "acme")  # queued + processing
        await new_running_job(store, "globex")  # not for acme
        b = await new_running_job(store, "acme")
        feed = await read(4)
    assert [(d["job_id"], e) for _, e, d in feed] == [
        (a, "job.queued"), (a, "job.processing"), (b, "job.queued"), (b, "job.processing"),
    ]  # fmt: skip
    # Resume from the second event: exactly the two after it.
    rest = await collect(client, "/events", headers={"Last-Event-ID": feed[1][0]}, until=2)
    assert ids(rest) == ids(feed)[2:]


async def test_a_tenant_feed_without_an_id_starts_live_and_marks_its_position(
    client: httpx.AsyncClient, store: Store
) -> None:
    old = await new_running_job(store)
    async with aconnect_sse(client, "GET", "/events", headers={}) as source:
        events = dispatched(source.aiter_sse())
        new = await new_running_job(store)
        first: ServerSentEvent = await anext(events)
    assert orjson.loads(first.data)["job_id"] == new != old
    assert first.event == "job.queued"


async def test_streams_send_retry_and_keep_alive_pings(redis_server: RedisProcess, store: Store) -> None:
    settings = make_settings(redis_server.url, sse_ping_s=0.2)
    handle = ServerHandle(settings)
    await handle.start()
    try:
        job_id = await new_running_job(store)
        raw = b""
        async with (
            httpx.AsyncClient(base_url=handle.url, headers=ACME) as c,
            c.stream("GET", f"/jobs/{job_id}/events") as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            async with asyncio.timeout(5):
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if raw.count(b": ping") >= 2:
                        break
        assert raw.startswith(b"retry: 2000\n\n")
        assert raw.count(b": ping\r\n\r\n") + raw.count(b": ping\n\n") >= 2
        # One line separator in every frame: events, the retry head and pings alike.
        assert b"\r" not in raw and raw.count(b": ping\n\n") >= 2
    finally:
        await handle.stop()


async def test_stream_auth_and_isolation(client: httpx.AsyncClient, store: Store) -> None:
    job_id = await new_running_job(store)
    other = await new_running_job(store, "globex")
    ticket = await client.post("/jobs", json={"type": "sleep", "params": {}})
    job_token = ticket.json()["token"]
    stream_token = (await client.post("/tokens")).json()["token"]
    no_auth = httpx.AsyncClient(base_url=str(client.base_url))
    async with no_auth:
        assert (await no_auth.get(f"/jobs/{job_id}/events")).status_code == 401
        assert (await no_auth.get("/events")).status_code == 401
        assert (await no_auth.get("/events", params={"token": "key-acme"})).status_code == 401
        assert (await no_auth.get("/events", params={"token": job_token})).status_code == 403
        wrong_job = await no_auth.get(f"/jobs/{job_id}/events", params={"token": job_token})
        assert wrong_job.status_code == 403
        own = await collect(no_auth, f"/jobs/{ticket.json()['id']}/events", params={"token": job_token}, until=1)
        assert own[0][1] == "job.queued"
        via_stream_token = await collect(no_auth, f"/jobs/{job_id}/events", params={"token": stream_token}, until=2)
        assert [e for _, e, _ in via_stream_token] == ["job.queued", "job.processing"]
    # Another tenant's job is a 404, before any stream starts.
    assert (await client.get(f"/jobs/{other}/events")).status_code == 404
    response = await client.get(f"/jobs/{job_id}/events", headers=GLOBEX)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("bad", ["abc", "1-2-3", "-1-0", "1732896301123", "9" * 30 + "-0"])
async def test_a_malformed_last_event_id_is_a_clear_400(client: httpx.AsyncClient, store: Store, bad: str) -> None:
    job_id = await new_running_job(store)
    response = await client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
    assert response.status_code == 400
    assert "Last-Event-ID" in response.json()["detail"]


async def test_an_id_older_than_the_capped_log_is_410_gone(redis_server: RedisProcess, store: Store) -> None:
    settings = make_settings(redis_server.url, tenant_log_max=1000)
    small = Store(store.redis, settings)
    first = await new_running_job(small)
    old_id = (await small.log_events("tenant", "acme"))[0].id
    for _ in range(700):  # 1,400 more events: the oldest ones are trimmed
        await new_running_job(small)
    handle = ServerHandle(settings)
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME) as c:
            response = await c.get("/events", headers={"Last-Event-ID": old_id})
            assert response.status_code == 410
            assert "GET /jobs" in response.json()["detail"]
            # A per-job log far below its cap is complete: its stream replays fine.
            seen = await collect(c, f"/jobs/{first}/events", until=2)
            assert [e for _, e, _ in seen] == ["job.queued", "job.processing"]
    finally:
        await handle.stop()


async def test_a_slow_consumer_is_cut_off_without_hurting_the_others(redis_server: RedisProcess, store: Store) -> None:
    settings = make_settings(redis_server.url, sse_send_timeout_s=1.0)
    handle = ServerHandle(settings)
    await handle.start()
    job_id = await new_running_job(store)
    blob = "x" * 8000
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME, timeout=30) as c:
            fast = asyncio.create_task(collect(c, f"/jobs/{job_id}/events", timeout=60))
            # The slow client opens the same stream and never reads from it.
            reader, writer = await asyncio.open_connection("127.0.0.1", handle.port)
            writer.write(
                f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n\r\n".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.3)
            # ~16 MB: more than the loopback socket buffers hold, so writes to the slow one stall.
            for i in range(1, 2001):
                await store.progress(job_id, 1, i / 20, blob, None)
            await store.complete(job_id, 1, "1")
            seen = await fast
            assert len(seen) == 2 + 2000 + 1 and seen[-1][1] == "job.completed"
            # The slow one was disconnected: what it has not read yet ends in EOF, not a hang.
            received = 0
            async with asyncio.timeout(20):
                while chunk := await reader.read(1 << 20):
                    received += len(chunk)
            assert received < 2000 * 8000  # it did not get the whole stream
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    finally:
        await handle.stop()


#: One TLS context for every client of a test (never used: the servers are plain HTTP). httpx builds
#: one per client otherwise, ~20 ms of blocked event loop each: a thousand clients froze the loop the
#: servers under test share for 20 s, and the test measured that instead of the streams.
_TLS = ssl.create_default_context()


async def _stream_with_resume(
    url_base: list[str], job_id: str, expected_total: int, timeout: float = 30, restarted: asyncio.Event | None = None
) -> Seen:
    """A client that reconnects (to whichever server is listed first) with Last-Event-ID. With
    ``restarted``, one whose stream ended before that is set (its server going away) reconnects once
    it is (the next server listens, listed first), instead of every 50 ms: hundreds of clients
    retrying against a stopped server took the test's one event loop from both servers."""
    seen: Seen = []
    async with asyncio.timeout(timeout):
        while True:
            headers = dict(ACME)
            if seen:
                headers["Last-Event-ID"] = seen[-1][0]
            try:
                async with httpx.AsyncClient(base_url=url_base[0], timeout=timeout, verify=_TLS) as c:
                    response_status = None
                    async with aconnect_sse(c, "GET", f"/jobs/{job_id}/events", headers=headers) as source:
                        response_status = source.response.status_code
                        if response_status == 204:
                            return seen
                        async for sse in dispatched(source.aiter_sse()):
                            seen.append((sse.id, sse.event, orjson.loads(sse.data)))
                    if seen and seen[-1][1] == "job.completed":
                        return seen
            except (httpx.TransportError, httpx.RemoteProtocolError):
                pass
            if restarted is not None and not restarted.is_set():
                await restarted.wait()
            else:
                await asyncio.sleep(0.05)


async def test_streams_resume_across_a_server_restart(settings: Settings, store: Store, redis: Redis) -> None:
    first = ServerHandle(settings)
    await first.start()
    job_id = await new_running_job(store)
    urls = [first.url]
    readers = [asyncio.create_task(_stream_with_resume(urls, job_id, 0)) for _ in range(20)]
    for percent in range(1, 21):
        await store.progress(job_id, 1, percent, None, None)
    await asyncio.sleep(0.3)
    await first.stop()  # drains: every stream ends, clients reconnect
    for percent in range(21, 41):  # events while no server runs
        await store.progress(job_id, 1, percent, None, None)
    second = ServerHandle(settings)
    await second.start()
    urls[0] = second.url
    for percent in range(41, 61):
        await store.progress(job_id, 1, percent, None, None)
    await store.complete(job_id, 1, "1")
    results = await asyncio.gather(*readers)
    await second.stop()
    expected = log_ids(await redis.xrange(schema.job_log_key(job_id)))
    for seen in results:
        assert ids(seen) == expected


async def test_a_stream_whose_last_event_the_log_lost_ends_at_the_resync_instead_of_resuming_past_the_hole(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub's pub/sub connection is killed, and meanwhile the log lost the last event the stream
    sent (as a failover loses an unreplicated write): at the resync the stream cannot say where to
    resume, so it ends rather than resuming after an event the log no longer has, or hanging."""
    caplog.set_level(logging.WARNING, logger="jobcast")
    hub = hub_of(server)
    job_id = await new_running_job(store)
    await store.progress(job_id, 1, 10, None, None)
    seen: Seen = []
    async with asyncio.timeout(30), aconnect_sse(client, "GET", f"/jobs/{job_id}/events") as source:
        events = dispatched(source.aiter_sse())
        for _ in range(3):
            sse = await anext(events)
            seen.append((sse.id, sse.event, orjson.loads(sse.data)))
        assert [e for _, e, _ in seen] == ["job.queued", "job.processing", "job.progress"]
        assert await redis.xdel(schema.job_log_key(job_id), seen[-1][0]) == 1
        assert hub.connected.is_set()
        assert await redis.client_kill_filter(_type="pubsub") >= 1  # the hub's: it resubscribes, then resyncs
        rest = [sse async for sse in events]  # the stream ends
    assert rest == []
    assert "its last event is no longer in the log; closed" in caplog.text


async def test_streams_resume_across_a_redis_restart(
    server: ServerHandle, store: Store, redis: Redis, redis_server: RedisProcess
) -> None:
    job_id = await new_running_job(store)
    readers = [asyncio.create_task(_stream_with_resume([server.url], job_id, 0, timeout=40)) for _ in range(10)]
    for percent in range(1, 11):
        await store.progress(job_id, 1, percent, None, None)
    await subscribed(server, 10)  # every reader is on the stream when Redis goes
    redis_server.stop()  # graceful: the append-only file is flushed
    await asyncio.sleep(0.5)
    redis_server.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            await store.progress(job_id, 1, 11, None, None)
            break
        except (RedisError, OSError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError("Redis did not come back") from exc
            await asyncio.sleep(0.1)
    for percent in range(12, 31):
        await store.progress(job_id, 1, percent, None, None)
    await store.complete(job_id, 1, "1")
    results = await asyncio.gather(*readers)
    expected = log_ids(await redis.xrange(schema.job_log_key(job_id)))
    assert len(expected) == 2 + 30 + 1
    for seen in results:
        assert ids(seen) == expected


async def test_two_server_processes_serve_one_job_s_events(settings: Settings, store: Store, tmp_path: Any) -> None:
    a, b = WebProcess(settings, tmp_path / "a.log"), WebProcess(settings, tmp_path / "b.log")
    try:
        await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
        async with (
            httpx.AsyncClient(base_url=a.url, headers=ACME) as ca,
            httpx.AsyncClient(base_url=b.url, headers=ACME) as cb,
        ):
            ticket = (await ca.post("/jobs", json={"type": "sleep", "params": {}})).json()
            job_id = ticket["id"]
            on_b = asyncio.create_task(collect(cb, f"/jobs/{job_id}/events"))
            await asyncio.sleep(0.3)
            run = await store.start(job_id, 1, 10**15)
            assert run is not None
            await store.progress(job_id, 1, 50, None, None)
            await store.complete(job_id, 1, "1")
            seen = await on_b
            assert [e for _, e, _ in seen] == ["job.queued", "job.processing", "job.progress", "job.completed"]
    finally:
        a.close()
        b.close()


async def _finish_job_and_check_every_reader(
    store: Store, redis: Redis, job_id: str, readers: list[asyncio.Task[Seen]]
) -> None:
    """Ten more events and the end; every reader saw the job's whole log, no gap, no duplicate."""
    for percent in range(11, 21):
        await store.progress(job_id, 1, percent, None, None)
    await store.complete(job_id, 1, "1")
    results = await asyncio.gather(*readers)
    expected = log_ids(await redis.xrange(schema.job_log_key(job_id)))
    assert all(ids(seen) == expected for seen in results)


async def test_sigterm_ends_streams_at_once_and_clients_resume_on_another_server(
    settings: Settings, store: Store, redis: Redis, tmp_path: Any
) -> None:
    web = WebProcess(settings, tmp_path / "web.log")
    backup = ServerHandle(settings)
    try:
        await asyncio.to_thread(web.wait_ready)
        job_id = await new_running_job(store)
        urls = [web.url]
        readers = [asyncio.create_task(_stream_with_resume(urls, job_id, 0)) for _ in range(50)]
        for percent in range(1, 11):
            await store.progress(job_id, 1, percent, None, None)
        await asyncio.sleep(0.5)
        await backup.start()
        urls[0] = backup.url
        signalled = time.monotonic()
        web.signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the exit reads as "by SIGTERM".
        assert await asyncio.to_thread(web.wait, 10) == -signal.SIGTERM
        # Streams never end by themselves: a prompt exit means they were drained, not waited out.
        assert time.monotonic() - signalled < 3
        await _finish_job_and_check_every_reader(store, redis, job_id, readers)
    finally:
        web.close()
        await backup.stop()


async def test_a_shutdown_with_redis_paused_leaves_no_redis_connection_behind(
    settings: Settings, store: Store, redis: Redis
) -> None:
    """A server stopping while Redis does not answer (paused longer than the graceful shutdown):
    the requests uvicorn cancels (streams still opening) and the removal of the ended streams'
    slots end before the server closes its Redis connections, and none is left to the garbage
    collector (the suite's teardown fails a test that leaves one)."""
    handle = ServerHandle(settings)
    await handle.start()
    job_id = await new_running_job(store)
    writers: list[asyncio.StreamWriter] = []
    request = f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n\r\n".encode()
    try:
        for _ in range(5):  # open streams, whose slots are removed from Redis as they end
            reader, writer = await asyncio.open_connection("127.0.0.1", handle.port)
            writers.append(writer)
            writer.write(request)
            await reader.readuntil(b"retry:")
        await redis.execute_command("CLIENT", "PAUSE", 8000, "ALL")
        for _ in range(20):  # streams opening: waiting for Redis, or for a connection to it
            _, writer = await asyncio.open_connection("127.0.0.1", handle.port)
            writer.write(request)
            writers.append(writer)

        async def all_waiting() -> bool:
            return len(handle.server.server_state.tasks) == 20  # uvicorn's: the requests it runs

        await wait_until(all_waiting)
    finally:
        await handle.stop()
        for writer in writers:
            writer.close()


async def test_a_reconnect_storm_resumes_every_stream_across_a_server_restart(
    settings: Settings, store: Store, redis: Redis
) -> None:
    """300 streams, all back at once on the new server: enough to prove every one resumes exactly;
    how long a storm of 10,000 takes is bench/sse_storm.py's figure (BENCHMARKS.md)."""
    first = ServerHandle(settings)
    await first.start()
    job_id = await new_running_job(store)
    urls = [first.url]
    restarted = asyncio.Event()
    readers = [
        asyncio.create_task(_stream_with_resume(urls, job_id, 0, timeout=90, restarted=restarted)) for _ in range(STORM)
    ]
    for percent in range(1, 11):
        await store.progress(job_id, 1, percent, None, None)
        await asyncio.sleep(0.05)
    await first.stop()
    for percent in range(11, 21):
        await store.progress(job_id, 1, percent, None, None)
    second = ServerHandle(settings)
    await second.start()
    urls[0] = second.url
    restarted.set()  # every stream back at once: the storm
    for percent in range(21, 31):
        await store.progress(job_id, 1, percent, None, None)
        await asyncio.sleep(0.05)
    await store.complete(job_id, 1, "1")
    results = await asyncio.gather(*readers)
    await second.stop()
    expected = log_ids(await redis.xrange(schema.job_log_key(job_id)))
    assert len(expected) == 2 + 30 + 1
    # Every client checks its sequence against the job's log: no gap, no duplicate.
    assert sum(ids(seen) == expected for seen in results) == STORM


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    """The value of one sample of this server's /metrics (``name`` with its labels, if any)."""
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_write_that_times_out_is_a_slow_consumer_not_a_redis_outage(
    redis_server: RedisProcess, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobcast")
    settings = make_settings(redis_server.url, sse_send_timeout_s=0.5)
    handle = ServerHandle(settings)
    await handle.start()
    job_id = await new_running_job(store)
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME, timeout=30) as c:
            # A client that opens the stream and never reads from it.
            _reader, writer = await asyncio.open_connection("127.0.0.1", handle.port)
            writer.write(
                f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n\r\n".encode()
            )
            await writer.drain()
            await wait_until(lambda: _is(c, "jobcast_sse_streams_open", 1))
            # ~12 MB in fewer events than a backlog holds: the writes stall, and time out.
            blob = "x" * 60_000
            for i in range(1, 201):
                await store.progress(job_id, 1, i / 4, blob, None)
            await wait_until(lambda: _is(c, "jobcast_sse_slow_consumers_cut_total", 1), timeout=30)
            await wait_until(lambda: _is(c, "jobcast_sse_streams_open", 0), timeout=30)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert "too slow" in caplog.text
        assert "Redis unavailable" not in caplog.text
    finally:
        await handle.stop()


async def _is(client: httpx.AsyncClient, name: str, value: float) -> bool:
    return await _metric(client, name) == value


async def test_a_last_event_id_ahead_of_the_log_is_a_400_and_a_finished_job_s_stream_is_over(
    client: httpx.AsyncClient, store: Store
) -> None:
    job_id = await new_running_job(store)
    ahead = {"Last-Event-ID": "99999999999999-0"}
    async with asyncio.timeout(10):  # before the fix these streams opened and never ended
        for url in ("/events", f"/jobs/{job_id}/events"):
            response = await client.get(url, headers=ahead)
            assert response.status_code == 400
            assert response.headers["content-type"] == "application/problem+json"
            assert "ahead of this stream" in response.json()["detail"]
        await store.complete(job_id, 1, "1")
        # A finished job's stream is over whatever id the client sends.
        assert (await client.get(f"/jobs/{job_id}/events", headers=ahead)).status_code == 204
        # An id from the log's past replays what follows it, up to the terminal event, and ends.
        seen = await collect(client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": "1-0"})
        assert [e for _, e, _ in seen] == ["job.queued", "job.processing", "job.completed"]


async def test_stream_routes_refuse_unknown_query_parameters_as_problems(client: httpx.AsyncClient) -> None:
    response = await client.get("/events", params={"limt": "5"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "Unknown query parameter" in response.json()["detail"]
    assert (await client.post("/events")).status_code == 405


async def test_the_hub_writes_live_events_without_a_task_per_stream(client: httpx.AsyncClient, store: Store) -> None:
    """Live events reach an idle, reading stream by the hub's direct write (straight to the
    transport it took over from uvicorn): if every write went through a writer task, this fails."""
    job_id = await new_running_job(store)
    before = await _metric(client, 'jobcast_sse_writes_total{path="direct"}')
    async with aconnect_sse(client, "GET", f"/jobs/{job_id}/events") as source:
        events = dispatched(source.aiter_sse())
        assert [(await anext(events)).event for _ in range(2)] == ["job.queued", "job.processing"]
        for i in range(1, 6):
            await store.progress(job_id, 1, i, None, None)
            assert (await anext(events)).event == "job.progress"
    after = await _metric(client, 'jobcast_sse_writes_total{path="direct"}')
    assert after - before >= 5


def _established(pid: int, port: int, state: str = "01") -> int:
    """Connections to ``port`` that process ``pid`` holds open (from /proc); ``state="0A"``: its
    listening sockets on the port instead."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


async def _true(value: Any) -> bool:
    return bool(value)


async def _serving_both(servers: list[int], port: int) -> bool:
    return all(_established(pid, port) > 0 for pid in servers)


async def test_jobcast_web_runs_processes_that_share_the_port_and_drains_them_all_on_sigterm(
    settings: Settings, store: Store, redis: Redis, tmp_path: Any
) -> None:
    web = WebProcess(settings.model_copy(update={"web_processes": 2}), tmp_path / "web.log")
    backup = ServerHandle(settings)
    try:
        await asyncio.to_thread(web.wait_ready)
        servers = child_pids(web.process.pid)
        assert len(servers) == 2
        # The port answers as soon as one of them listens: wait for both, or every stream may go to
        # the first.
        await wait_until(lambda: _true(all(_established(pid, web.port, "0A") for pid in servers)), timeout=30)
        job_id = await new_running_job(store)
        urls = [web.url]
        readers = [asyncio.create_task(_stream_with_resume(urls, job_id, 0)) for _ in range(40)]
        # Both serve the port: the kernel spreads the connections over them.
        await wait_until(lambda: _serving_both(servers, web.port), timeout=30)
        for percent in range(1, 11):
            await store.progress(job_id, 1, percent, None, None)
        await backup.start()
        urls[0] = backup.url
        web.signal(signal.SIGTERM)
        # Like one uvicorn, the supervisor exits by the signal, once every server process has drained.
        assert await asyncio.to_thread(web.wait, 15) == -signal.SIGTERM
        assert not any(os.path.exists(f"/proc/{pid}") for pid in servers)
        await _finish_job_and_check_every_reader(store, redis, job_id, readers)
    finally:
        web.close()
        await backup.stop()
