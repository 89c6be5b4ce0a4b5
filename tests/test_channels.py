"""Per-tenant channels subscribed on demand (issue 13): a server's pub/sub traffic follows its own
clients, and a stream reads the log only once Redis has confirmed its subscription."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx
import pytest
from redis.asyncio import Redis

from jobcast import channels
from jobcast.hub import Hub
from jobcast.services import STATE_KEY
from jobcast.worker import schema
from jobcast.worker.store import Store

from .conftest import ACME, GLOBEX, ServerHandle, before_the_wait_ends, hub_of, wait_until
from .test_operations import samples
from .test_sse import collect, ids, live_feed, log_ids, new_running_job
from .wsclient import ws_connect

ACME_CHANNEL = schema.tenant_channel(0, "acme")
GLOBEX_CHANNEL = schema.tenant_channel(0, "globex")
Stage = Literal["sending", "unsubscribing", "confirmed"]


async def numsub(redis: Redis, channel: str) -> int:
    [(_, count)] = await redis.pubsub_numsub(channel)
    return int(count)


def subscribers(redis: Redis, channel: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await numsub(redis, channel) == count

    return check


def listeners(hub: Hub, tenant: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return hub.channels.listeners(tenant) == count

    return check


def on_first(stage: Stage, channel: str, action: Callable[[], Awaitable[None]]) -> Any:
    """A subscribe hook that runs ``action`` the first time ``channel`` reaches ``stage``."""
    done: set[Stage] = set()

    async def hook(at: Stage, names: list[str]) -> None:
        if at == stage and channel in names and stage not in done:
            done.add(stage)
            await action()

    return hook


def hooks(*each: Any) -> Any:
    async def hook(at: Stage, names: list[str]) -> None:
        for one in each:
            await one(at, names)

    return hook


async def test_a_server_with_listeners_of_one_tenant_receives_no_events_of_the_others(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    await wait_until(lambda: _true(hub.connected.is_set()))
    assert await numsub(redis, ACME_CHANNEL) == 0  # no listener: not subscribed
    async with live_feed(client) as read:
        assert hub.subscriber_count == 1
        received = hub.received
        assert set(await redis.pubsub_channels("jobcast:*")) == {ACME_CHANNEL, schema.hub_channel(0)}
        assert (await numsub(redis, ACME_CHANNEL), await numsub(redis, GLOBEX_CHANNEL)) == (1, 0)
        for _ in range(5):
            await new_running_job(store, "globex")  # 10 events the server never sees
        a = await new_running_job(store, "acme")
        b = await new_running_job(store, "acme")
        feed = await read(4)
    assert [(d["job_id"], e) for _, e, d in feed] == [
        (a, "job.queued"), (a, "job.processing"), (b, "job.queued"), (b, "job.processing"),
    ]  # fmt: skip
    # Redis delivers a connection's messages in order: globex's, published first, would be in.
    assert hub.received - received == 4
    m = samples((await client.get("/metrics")).text)
    assert m[("jobcast_sse_tenant_channels", ())] == 1
    assert m[("jobcast_sse_messages_received_total", ())] == hub.received


async def test_a_tenant_channel_is_subscribed_once_for_all_listeners_and_left_after_the_last(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    hub.channels.linger_s = 0.05
    await wait_until(lambda: _true(hub.connected.is_set()))
    job_id = await new_running_job(store)
    subscribes = hub.channels.subscribes
    # Every kind of listener: an event stream, a long-poll, a socket's job and tenant channels.
    stream = asyncio.create_task(collect(client, f"/jobs/{job_id}/events", timeout=30))
    poll = asyncio.create_task(client.get(f"/jobs/{job_id}", params={"wait": "60"}))
    async with ws_connect(server.url, ACME) as ws:
        await ws.subscribe("tenant")  # live from here (its reply comes once it is)
        await ws.subscribe(f"job:{job_id}")
        await wait_until(listeners(hub, "acme", 4))
        assert hub.channels.subscribes - subscribes == 1  # one SUBSCRIBE, shared
        assert await numsub(redis, ACME_CHANNEL) == 1
        async with before_the_wait_ends():
            await store.progress(job_id, 1, 50, None, None)  # ends the long-poll
            assert (await poll).json()["progress"]["percent"] == 50
        await store.complete(job_id, 1, "1")  # ends the job stream and the socket's job channel
        await ws.events_until_end(f"job:{job_id}")
        await stream
        await ws.request({"op": "unsubscribe", "channel": "tenant"})
        await wait_until(listeners(hub, "acme", 0))
    await wait_until(lambda: _true(hub.channels.subscribed == 0))  # left after the linger
    assert hub.channels.unsubscribes == 1 and await numsub(redis, ACME_CHANNEL) == 0


async def test_a_listener_that_comes_back_within_the_linger_reuses_the_subscription(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    hub.channels.linger_s = 600.0
    job_id = await new_running_job(store)
    await collect(client, f"/jobs/{job_id}/events", until=2)
    await wait_until(listeners(hub, "acme", 0))
    assert await numsub(redis, ACME_CHANNEL) == 1  # lingering
    subscribes = hub.channels.subscribes
    seen = await collect(client, f"/jobs/{job_id}/events", until=2)
    assert len(seen) == 2 and hub.channels.subscribes == subscribes  # no new SUBSCRIBE


async def test_an_event_published_while_a_stream_subscribes_is_delivered_exactly_once(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    job_id = await new_running_job(store)
    opened_early: list[int] = []

    async def before_the_subscribe_is_sent() -> None:
        await store.progress(job_id, 1, 30, None, None)  # only in the log: nobody is subscribed yet

    async def once_confirmed_before_anyone_is_told() -> None:
        # Nothing has read the log yet (the open script takes the tenant's stream slot).
        opened_early.append(await redis.zcard(schema.streams_key("acme")))
        await store.progress(job_id, 1, 60, None, None)  # in the log and on the channel

    hub.channels.hook = hooks(
        on_first("sending", ACME_CHANNEL, before_the_subscribe_is_sent),
        on_first("confirmed", ACME_CHANNEL, once_confirmed_before_anyone_is_told),
    )
    reader = asyncio.create_task(collect(client, f"/jobs/{job_id}/events", timeout=30))
    await wait_until(lambda: _true(hub.subscriber_count == 1))
    await store.complete(job_id, 1, "1")
    seen = await reader
    assert opened_early == [0]
    assert [d["progress"]["percent"] for _, e, d in seen if e == "job.progress"] == [30, 60]
    assert ids(seen) == log_ids(await redis.xrange(schema.job_log_key(job_id)))


async def test_concurrent_streams_of_a_tenant_share_one_subscribe_and_all_wait_for_it(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    await wait_until(lambda: _true(hub.connected.is_set()))
    jobs = [await new_running_job(store) for _ in range(5)]
    subscribes = hub.channels.subscribes
    opened_early: list[int] = []

    async def when_all_are_attached() -> None:
        await wait_until(listeners(hub, "acme", len(jobs)))  # all wait on this one SUBSCRIBE
        for job_id in jobs:
            await store.progress(job_id, 1, 30, None, None)

    async def confirmed() -> None:
        opened_early.append(await redis.zcard(schema.streams_key("acme")))

    hub.channels.hook = hooks(
        on_first("sending", ACME_CHANNEL, when_all_are_attached), on_first("confirmed", ACME_CHANNEL, confirmed)
    )
    readers = [asyncio.create_task(collect(client, f"/jobs/{job_id}/events", timeout=30)) for job_id in jobs]
    await wait_until(lambda: _true(hub.subscriber_count == len(jobs)))
    for job_id in jobs:
        await store.complete(job_id, 1, "1")
    results = await asyncio.gather(*readers)
    assert hub.channels.subscribes - subscribes == 1 and opened_early == [0]
    for job_id, seen in zip(jobs, results, strict=True):
        assert ids(seen) == log_ids(await redis.xrange(schema.job_log_key(job_id)))
        assert [e for _, e, _ in seen] == ["job.queued", "job.processing", "job.progress", "job.completed"]


async def test_a_stream_that_comes_while_its_channel_is_being_left_waits_for_the_new_subscribe(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    hub.channels.linger_s = 0
    job_id = await new_running_job(store)
    await collect(client, f"/jobs/{job_id}/events", until=2)  # subscribes, then leaves: UNSUBSCRIBE
    second: list[asyncio.Task[Any]] = []
    opened_early: list[set[str]] = []
    #: The first stream's tenant slot, until it is removed (StreamSlots.REMOVE_AFTER_S): not the second's.
    left_behind: set[str] = set()

    async def while_the_channel_is_left() -> None:
        left_behind.update(await redis.zrange(schema.streams_key("acme"), 0, -1))  # before the second opens
        second.append(asyncio.create_task(collect(client, f"/jobs/{job_id}/events", timeout=30)))
        await wait_until(listeners(hub, "acme", 1))  # it came while the channel is still subscribed
        await store.progress(job_id, 1, 30, None, None)  # delivered to it AND in the log

    async def resubscribed() -> None:
        opened_early.append(set(await redis.zrange(schema.streams_key("acme"), 0, -1)) - left_behind)
        await store.progress(job_id, 1, 60, None, None)

    subscribes = hub.channels.subscribes
    hub.channels.hook = hooks(
        on_first("unsubscribing", ACME_CHANNEL, while_the_channel_is_left),
        on_first("confirmed", ACME_CHANNEL, resubscribed),
    )
    await wait_until(lambda: _true(bool(second)))
    await wait_until(lambda: _true(hub.subscriber_count == 1))
    await store.complete(job_id, 1, "1")
    seen = await second[0]
    assert hub.channels.subscribes - subscribes == 1 and opened_early == [set()]  # read after the new one
    assert [d["progress"]["percent"] for _, e, d in seen if e == "job.progress"] == [30, 60]
    assert ids(seen) == log_ids(await redis.xrange(schema.job_log_key(job_id)))


async def test_a_subscription_redis_does_not_confirm_answers_503_and_lets_go_of_everything(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = hub_of(server)
    monkeypatch.setattr(channels, "CONFIRM_TIMEOUT_S", 0.2)
    job_id = await new_running_job(store)
    answered = asyncio.Event()

    async def hold_the_subscribe() -> None:
        async with asyncio.timeout(30):
            await answered.wait()

    hub.channels.hook = on_first("sending", ACME_CHANNEL, hold_the_subscribe)
    refused = await client.get(f"/jobs/{job_id}/events")
    poll = await client.get(f"/jobs/{job_id}", params={"wait": "60"})
    async with ws_connect(server.url, ACME) as ws:
        error = await ws.request({"op": "subscribe", "channel": f"job:{job_id}"})
    answered.set()
    for answer in (refused, poll):
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/problem+json"
    assert error["op"] == "error" and error["status"] == 503
    assert hub.channels.listeners("acme") == 0 and await redis.zcard(schema.streams_key("acme")) == 0
    seen = await collect(client, f"/jobs/{job_id}/events", until=2)  # the next one gets through
    assert [e for _, e, _ in seen] == ["job.queued", "job.processing"]


async def test_a_long_poll_sees_a_change_made_while_it_subscribes(
    server: ServerHandle, client: httpx.AsyncClient, store: Store
) -> None:
    hub = hub_of(server)
    job_id = await new_running_job(store)
    etag = (await client.get(f"/jobs/{job_id}")).headers["etag"]

    async def change() -> None:
        await store.progress(job_id, 1, 40, None, None)  # before anyone is subscribed

    hub.channels.hook = on_first("sending", ACME_CHANNEL, change)
    async with before_the_wait_ends():
        answer = await client.get(f"/jobs/{job_id}", params={"wait": "60"}, headers={"If-None-Match": etag})
    assert answer.status_code == 200 and answer.json()["progress"]["percent"] == 40


async def test_a_websocket_tenant_channel_starts_after_what_was_published_while_it_subscribed(
    server: ServerHandle, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    job_id = await new_running_job(store)

    async def change() -> None:
        await store.progress(job_id, 1, 40, None, None)  # before anyone is subscribed

    hub.channels.hook = on_first("sending", ACME_CHANNEL, change)
    async with ws_connect(server.url, ACME) as ws:
        reply = await ws.subscribe("tenant")
        # Live from the tip read once subscribed: the change is behind it, everything later follows.
        [(tip, _)] = await redis.xrevrange(schema.tenant_log_key("acme"), count=1)
        assert reply["last_event_id"] == tip
        await store.complete(job_id, 1, "1")
        [frame] = await ws.events("tenant", 1)
    assert frame["event"] == "job.completed" and frame["id"] > tip


async def test_a_reconnect_subscribes_every_tenant_again_and_streams_miss_nothing(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    hub = hub_of(server)
    acme_job = await new_running_job(store, "acme")
    globex_job = await new_running_job(store, "globex")
    readers = [
        asyncio.create_task(collect(client, f"/jobs/{acme_job}/events", timeout=30)),
        asyncio.create_task(collect(client, f"/jobs/{globex_job}/events", headers=GLOBEX, timeout=30)),
    ]
    await wait_until(lambda: _true(hub.subscriber_count == 2))

    # The reconnect's one SUBSCRIBE names both tenants and the hub's own channel.
    published = asyncio.Event()

    async def while_nobody_listens() -> None:
        await store.progress(acme_job, 1, 10, None, None)
        await store.progress(globex_job, 1, 10, None, None)
        published.set()

    hub.channels.hook = on_first("sending", schema.hub_channel(0), while_nobody_listens)
    await redis.client_kill_filter(_type="pubsub")  # the hub's pub/sub connection
    async with asyncio.timeout(20):
        await published.wait()
    await wait_until(lambda: _true(hub.connected.is_set()))
    assert (await numsub(redis, ACME_CHANNEL), await numsub(redis, GLOBEX_CHANNEL)) == (1, 1)
    for job_id in (acme_job, globex_job):
        await store.progress(job_id, 1, 20, None, None)
        await store.complete(job_id, 1, "1")
    for job_id, reader in zip((acme_job, globex_job), readers, strict=True):
        seen = await reader
        assert ids(seen) == log_ids(await redis.xrange(schema.job_log_key(job_id)))
        assert [d["progress"]["percent"] for _, e, d in seen if e == "job.progress"] == [10, 20]


async def test_a_pub_sub_connection_redis_py_reopens_by_itself_is_taken_as_lost_and_streams_resync(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    """redis-py re-opens a pub/sub connection that was closed while nobody was reading it (as a
    failover's drop of every connection does, server/hub.py) and re-subscribes by itself. The hub's
    reader is held in a subscribe reply (its hook) while the connection is closed both ways (the
    process's connections dropped, as ``follow_primary`` does, and CLIENT KILL) and an event is
    published to no one; then the reader reads again. The hub must take the reopen as a lost
    connection (a reconnect of its own, counted), and the stream must get every event, none twice."""
    hub = hub_of(server)
    cell_redis = server.server.lifespan.state[STATE_KEY].cells[0].redis
    job_id = await new_running_job(store)
    reader = asyncio.create_task(collect(client, f"/jobs/{job_id}/events", timeout=30))
    await wait_until(lambda: _true(hub.subscriber_count == 1))
    reconnects = hub.reconnects

    async def closed_while_nobody_reads() -> None:
        await cell_redis.connection_pool.disconnect()  # closes the pub/sub connection too
        await redis.client_kill_filter(_type="pubsub")
        await wait_until(subscribers(redis, ACME_CHANNEL, 0))
        await store.progress(job_id, 1, 10, None, None)  # in the log, published to no one

    hub.channels.hook = on_first("confirmed", GLOBEX_CHANNEL, closed_while_nobody_reads)
    async with hub.subscribe("tenant", "globex", "globex"):  # a SUBSCRIBE reply for the hook
        pass
    await wait_until(lambda: _true(hub.connected.is_set() and hub.reconnects == reconnects + 1))
    await store.progress(job_id, 1, 20, None, None)
    await store.complete(job_id, 1, "1")
    seen = await reader
    assert ids(seen) == log_ids(await redis.xrange(schema.job_log_key(job_id)))
    assert [d["progress"]["percent"] for _, e, d in seen if e == "job.progress"] == [10, 20]
    assert hub.reconnects == reconnects + 1


async def _true(value: bool) -> bool:
    return value
