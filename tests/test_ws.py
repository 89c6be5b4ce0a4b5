"""``GET /ws``: many channels over one socket, exactly-once replay, cancel, auth, limits."""

from __future__ import annotations

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.store import Store

from .conftest import ACME, GLOBEX, ServerHandle, make_settings
from .test_sse import collect, log_ids, new_running_job
from .wsclient import Frame, triples, ws_connect, ws_url


async def test_a_job_channel_replays_then_goes_live_then_ends_exactly_as_its_sse_stream(
    server: ServerHandle, client: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    job_id = await new_running_job(store)
    await store.progress(job_id, 1, 10, "first", None)
    channel = f"job:{job_id}"
    async with ws_connect(server.url, ACME) as ws:
        reply = await ws.subscribe(channel)
        assert reply == {"op": "ok", "ref": reply["ref"]}
        replayed = await ws.events(channel, 3)  # queued, processing, progress: the history
        for percent in (20, 30):
            await store.progress(job_id, 1, percent, None, None)
        await store.complete(job_id, 1, '{"ok": true}')
        live = await ws.events_until_end(channel)
        # The channel is unsubscribed after its end: a new subscription is not a conflict.
        assert (await ws.subscribe(channel))["op"] == "ok"
        assert len(await ws.events_until_end(channel)) == 6
    sse = await collect(client, f"/jobs/{job_id}/events")
    assert triples(replayed + live) == sse
    assert [f["id"] for f in replayed + live] == log_ids(await redis.xrange(schema.job_log_key(job_id)))
    assert live[-1]["event"] == "job.completed" and live[-1]["data"]["result"] == {"ok": True}


async def test_many_jobs_over_one_socket_and_unsubscribe_stops_a_channel(server: ServerHandle, store: Store) -> None:
    first, second = await new_running_job(store), await new_running_job(store)
    async with ws_connect(server.url, ACME) as ws:
        await ws.subscribe(f"job:{first}")
        await ws.subscribe(f"job:{second}")
        seen: dict[str, list[Frame]] = {f"job:{first}": [], f"job:{second}": []}
        for _ in range(4):  # two events of history each, interleaved in any order
            frame = await ws.recv()
            seen[frame["channel"]].append(frame)
        assert all(len(frames) == 2 for frames in seen.values())
        assert all(frame["data"]["job_id"] == channel[4:] for channel, fs in seen.items() for frame in fs)
        assert (await ws.request({"op": "unsubscribe", "channel": f"job:{first}"}))["op"] == "ok"
        await store.progress(first, 1, 50, None, None)  # not followed any more
        await store.progress(second, 1, 50, None, None)
        await store.complete(second, 1, "1")
        rest = await ws.events_until_end(f"job:{second}")
        assert [f["event"] for f in rest] == ["job.progress", "job.completed"]
        assert (await ws.request({"op": "ping"}))["op"] == "pong"
        assert ws.pending == []  # nothing of the unsubscribed job came
        # Unsubscribing from a channel not followed is fine; so is pinging.
        assert (await ws.request({"op": "unsubscribe", "channel": f"job:{first}"}))["op"] == "ok"


async def test_resuming_with_last_event_id_misses_and_repeats_nothing(
    server: ServerHandle, client: httpx.AsyncClient, store: Store
) -> None:
    job_id = await new_running_job(store)
    channel = f"job:{job_id}"
    for percent in range(5, 55, 5):
        await store.progress(job_id, 1, percent, None, None)
    async with ws_connect(server.url, ACME) as ws:
        await ws.subscribe(channel)
        first = await ws.events(channel, 6)
    for percent in range(55, 100, 5):  # while the client is away
        await store.progress(job_id, 1, percent, None, None)
    await store.complete(job_id, 1, "1")
    async with ws_connect(server.url, ACME) as ws:
        await ws.subscribe(channel, last_event_id=first[-1]["id"])
        rest = await ws.events_until_end(channel)
        # After the terminal event the channel is over: ok, then end at once (SSE answers 204).
        await ws.subscribe(channel, last_event_id=rest[-1]["id"])
        assert await ws.recv() == {"op": "end", "channel": channel}
    assert triples(first + rest) == await collect(client, f"/jobs/{job_id}/events")


async def test_the_tenant_channel_starts_live_carries_only_the_tenant_and_resumes(
    server: ServerHandle, client: httpx.AsyncClient, store: Store
) -> None:
    before = await new_running_job(store)
    async with ws_connect(server.url, ACME) as ws:
        reply = await ws.subscribe("tenant")
        # Live: its position is in the ok, as the SSE feed's lone "id:" line.
        tip = (await store.log_events("tenant", "acme"))[-1].id
        assert reply["last_event_id"] == tip
        await new_running_job(store, tenant="globex")
        ours = await new_running_job(store)
        events = await ws.events("tenant", 2)
        assert {f["data"]["job_id"] for f in events} == {ours}
    await store.progress(before, 1, 50, None, None)  # while away
    async with ws_connect(server.url, ACME) as ws:
        await ws.subscribe("tenant", last_event_id=reply["last_event_id"])
        resumed = await ws.events("tenant", 3)
    sse = await collect(client, "/events", headers={"Last-Event-ID": tip}, until=3)
    assert triples(resumed) == sse
    assert triples(resumed)[:2] == triples(events)


async def test_cancel_over_the_socket_needs_the_api_key(
    server: ServerHandle, client: httpx.AsyncClient, store: Store
) -> None:
    running = await new_running_job(store)
    queued = (await client.post("/jobs", json={"type": "sleep"})).json()
    async with ws_connect(server.url, ACME) as ws:
        assert await ws.request({"op": "cancel", "job_id": queued["id"]}) == {
            "op": "ok", "ref": "1", "status": "cancelled"
        }  # fmt: skip
        reply = await ws.request({"op": "cancel", "job_id": running})
        assert reply["op"] == "ok" and reply["status"] == "processing"  # requested: the worker stops it
        again = await ws.request({"op": "cancel", "job_id": queued["id"]})
        assert again["op"] == "error" and again["status"] == 409 and again["job_status"] == "cancelled"
        missing = await ws.request({"op": "cancel", "job_id": "job_01ARZ3NDEKTSV4RRFFQ69G5FAV"})
        assert missing["op"] == "error" and missing["status"] == 404
    token = (await client.post("/tokens")).json()["token"]
    async with ws_connect(server.url, token=token) as ws:
        refused = await ws.request({"op": "cancel", "job_id": running})
        assert refused["status"] == 403 and refused["type"] == "/problems/forbidden"
    assert (await client.get(f"/jobs/{running}")).json()["cancel_requested"] is True


async def test_credentials_are_refused_before_the_upgrade(server: ServerHandle, store: Store) -> None:
    cases: list[tuple[dict[str, str] | None, str | None, int]] = [
        (None, None, 401),
        ({"Authorization": "Bearer nope"}, None, 401),
        (None, "jc1.bad.token", 401),
        (None, "key-acme", 401),  # an API key is never taken from the URL
    ]
    for headers, token, status in cases:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(server.url, headers, token=token):
                pass
        response = refused.value.response
        assert response.status_code == status
        body = orjson.loads(response.body)
        assert body["status"] == status and body["type"] == "/problems/unauthorized"
        assert response.headers["Content-Type"] == "application/problem+json"
    with pytest.raises(InvalidStatus) as unknown:
        async with connect(ws_url(server.url) + "?tokn=x", additional_headers=ACME, proxy=None):
            pass
    assert unknown.value.response.status_code == 400
    assert "'tokn'" in orjson.loads(unknown.value.response.body)["detail"]


async def test_tokens_reach_only_their_channels(server: ServerHandle, client: httpx.AsyncClient, store: Store) -> None:
    mine = (await client.post("/jobs", json={"type": "sleep"})).json()
    other = await new_running_job(store)
    theirs = await new_running_job(store, tenant="globex")
    async with ws_connect(server.url, token=mine["token"]) as ws:
        assert (await ws.subscribe(f"job:{mine['id']}"))["op"] == "ok"
        for channel in (f"job:{other}", "tenant"):
            reply = await ws.request({"op": "subscribe", "channel": channel})
            assert reply["op"] == "error" and reply["status"] == 403, reply
    async with ws_connect(server.url, ACME) as ws:
        reply = await ws.request({"op": "subscribe", "channel": f"job:{theirs}"})
        assert reply["status"] == 404 and reply["title"] == "Not Found"
    async with ws_connect(server.url, GLOBEX) as ws:
        assert (await ws.subscribe(f"job:{theirs}"))["op"] == "ok"


async def test_the_subscription_cap_and_the_stream_caps(redis_server: RedisProcess, store: Store) -> None:
    settings = make_settings(redis_server.url, ws_max_subscriptions=2, sse_max_streams=1)
    handle = ServerHandle(settings)
    await handle.start()
    jobs = [await new_running_job(store) for _ in range(3)]
    try:
        async with ws_connect(handle.url, ACME) as ws:
            await ws.subscribe(f"job:{jobs[0]}")
            again = await ws.request({"op": "subscribe", "channel": f"job:{jobs[0]}"})
            assert again["status"] == 409
            await ws.subscribe(f"job:{jobs[1]}")
            full = await ws.request({"op": "subscribe", "channel": f"job:{jobs[2]}"})
            assert full["status"] == 429 and "JOBCAST_WS_MAX_SUBSCRIPTIONS" in full["detail"]
            # The one stream slot of this process is taken by this socket: a second one is refused.
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(handle.url, ACME):
                    pass
            assert refused.value.response.status_code == 503
            async with httpx.AsyncClient(base_url=handle.url, headers=ACME) as c:
                assert (await c.get("/events")).status_code == 503
        # Closed: the slot is free again.
        async with ws_connect(handle.url, ACME) as ws:
            assert (await ws.request({"op": "ping"}))["op"] == "pong"
    finally:
        await handle.stop()


async def test_a_socket_takes_one_of_the_tenant_s_stream_slots(redis_server: RedisProcess, store: Store) -> None:
    handle = ServerHandle(make_settings(redis_server.url, sse_max_streams_per_tenant=1))
    await handle.start()
    try:
        async with ws_connect(handle.url, ACME) as ws:
            await ws.subscribe("tenant")
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(handle.url, ACME):
                    pass
            assert refused.value.response.status_code == 429
            assert refused.value.response.headers["Retry-After"] == "5"
            async with ws_connect(handle.url, GLOBEX) as other:  # another tenant is not affected
                assert (await other.request({"op": "ping"}))["op"] == "pong"
    finally:
        await handle.stop()


async def test_an_id_older_than_the_capped_log_is_a_410_error_frame(redis_server: RedisProcess, store: Store) -> None:
    settings = make_settings(redis_server.url, tenant_log_max=1000)
    small = Store(store.redis, settings)
    await new_running_job(small)
    old_id = (await small.log_events("tenant", "acme"))[0].id
    for _ in range(700):
        await new_running_job(small)
    handle = ServerHandle(settings)
    await handle.start()
    try:
        async with ws_connect(handle.url, ACME) as ws:
            gone = await ws.request({"op": "subscribe", "channel": "tenant", "last_event_id": old_id})
            assert gone["status"] == 410 and "GET /jobs" in gone["detail"]
            assert (await ws.subscribe("tenant"))["op"] == "ok"  # not subscribed by the refusal
    finally:
        await handle.stop()


async def test_a_last_event_id_ahead_of_the_log_is_a_400_error_frame_as_on_the_sse_stream(
    server: ServerHandle, store: Store
) -> None:
    job_id = await new_running_job(store)
    ahead = "99999999999999-0"
    async with ws_connect(server.url, ACME) as ws:
        for channel in (f"job:{job_id}", "tenant"):
            refused = await ws.request({"op": "subscribe", "channel": channel, "last_event_id": ahead})
            assert refused["op"] == "error" and refused["status"] == 400, refused
            assert "ahead of this stream" in refused["detail"] and "last_event_id" in refused["detail"]
            assert (await ws.subscribe(channel))["op"] == "ok"  # not subscribed by the refusal
    await store.complete(job_id, 1, "1")
    async with ws_connect(server.url, ACME) as ws:
        # A finished job: nothing after its last event is over (ok, then end), not ahead.
        last = (await store.log_events("job", job_id))[-1].id
        assert (await ws.subscribe(f"job:{job_id}", last_event_id=last))["op"] == "ok"
        assert await ws.recv() == {"op": "end", "channel": f"job:{job_id}"}


async def test_a_channel_whose_last_event_the_log_lost_across_a_hub_reconnect_is_closed_1013(
    server: ServerHandle, store: Store, redis: Redis
) -> None:
    """As a failover that lost the last event sent (docs/design/sentinel.md): the channel must not
    resume past the hole. The loss is made by hand (XDEL of the last event, on the one Redis), and
    the reconnect by killing the hub's pub/sub connection. The socket is closed 1013; the client's
    re-subscription from that id is told to resync (410), and without an id it follows again."""
    job_id = await new_running_job(store)
    channel = f"job:{job_id}"
    async with ws_connect(server.url, ACME) as ws:
        await ws.subscribe(channel)
        sent = await ws.events(channel, 2)
        await redis.xdel(schema.job_log_key(job_id), sent[-1]["id"])
        assert await redis.client_kill_filter(_type="pubsub") >= 1
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv(timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    async with ws_connect(server.url, ACME) as ws:
        lost = await ws.request({"op": "subscribe", "channel": channel, "last_event_id": sent[-1]["id"]})
        assert lost["op"] == "error" and lost["status"] == 410, lost
        assert "Redis lost it when its primary changed" in lost["detail"]
        await ws.subscribe(channel)
        await store.complete(job_id, 1, "1")
        assert [f["event"] for f in await ws.events_until_end(channel)] == ["job.queued", "job.completed"]


async def test_per_message_deflate_is_off(server: ServerHandle) -> None:
    async with ws_connect(server.url, ACME) as ws:  # the client offers permessage-deflate
        assert (
            ws.conn.request is not None and "permessage-deflate" in ws.conn.request.headers["Sec-WebSocket-Extensions"]
        )
        assert ws.conn.response is not None and "Sec-WebSocket-Extensions" not in ws.conn.response.headers


async def test_a_plain_http_request_to_ws_is_426_upgrade_required(client: httpx.AsyncClient) -> None:
    response = await client.get("/ws")
    assert response.status_code == 426 and response.headers["Upgrade"] == "websocket"
    assert response.json()["type"] == "/problems/upgrade-required"
    assert (await client.get("/problems/upgrade-required")).json()["status"] == 426
    assert (await client.get("/ws", params={"tokn": "x"})).status_code == 400
    operations = (await client.get("/openapi.json")).json()["paths"]
    assert "426" in operations["/ws"]["get"]["responses"] and "/asyncapi.json" in operations


async def test_the_asyncapi_document_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/asyncapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["asyncapi"] == "3.0.0"
    assert set(document["channels"]) == {"jobEvents", "tenantEvents", "socket", "webhooks"}
