"""Rate limits and per-tenant concurrency, against real Redis, servers and workers."""

from __future__ import annotations

import asyncio
import contextlib
import re
from datetime import datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.limits import ProcessStreams, StreamSlots
from jobcast.worker import schema
from jobcast.worker.settings import ConfigError, parse_rate

from .conftest import (
    ACME,
    GLOBEX,
    ServerHandle,
    held_by_pause,
    make_settings,
    running_worker,
    serving,
    submit,
    wait_for_status,
    wait_until,
)

RATE_HEADER = re.compile(r'^"submit";r=(\d+);t=(\d+)$')


def remaining(response: httpx.Response) -> int:
    match = RATE_HEADER.match(response.headers["ratelimit"])
    assert match, response.headers["ratelimit"]
    return int(match[1])


async def test_submissions_over_the_rate_get_429_then_recover(redis_server: RedisProcess, redis: Redis) -> None:
    handle = ServerHandle(make_settings(redis_server.url, submit_rate="3/1"))
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME) as c:
            answers = [await c.post("/jobs", json={"type": "sleep"}) for _ in range(3)]
            assert [a.status_code for a in answers] == [202, 202, 202]
            assert [remaining(a) for a in answers] == [2, 1, 0]
            assert all(a.headers["ratelimit-policy"] == '"submit";q=3;w=1' for a in answers)
            refused = await c.post("/jobs", json={"type": "sleep"})
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            assert remaining(refused) == 0
            wait = int(refused.headers["retry-after"])
            assert 1 <= wait <= 1
            assert "3 jobs per 1 s" in refused.json()["detail"]
            # Another tenant has its own budget.
            other = await c.post("/jobs", json={"type": "sleep"}, headers=GLOBEX)
            assert other.status_code == 202
            # The refusal stored nothing: acme has exactly its three jobs.
            assert len((await c.get("/jobs")).json()["items"]) == 3
            await asyncio.sleep(wait)
            again = await c.post("/jobs", json={"type": "sleep"})
            assert again.status_code == 202
    finally:
        await handle.stop()


async def test_the_rate_limit_is_shared_by_server_processes(redis_server: RedisProcess, redis: Redis) -> None:
    settings = make_settings(redis_server.url, submit_rate="4/60")
    a, b = ServerHandle(settings), ServerHandle(settings)
    await a.start()
    await b.start()
    try:
        async with httpx.AsyncClient(headers=ACME) as c:
            codes = []
            for i in range(6):
                server = a if i % 2 == 0 else b
                codes.append((await c.post(f"{server.url}/jobs", json={"type": "sleep"})).status_code)
        assert codes == [202, 202, 202, 202, 429, 429]
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("bad", ["10", "0/10", "10/0", "ten/60", "10/-1", "1/2/3"])
def test_a_malformed_rate_is_a_startup_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="JOBCAST_SUBMIT_RATE"):
        parse_rate(bad)


@given(st.text(max_size=30))
def test_rate_parsing_accepts_exactly_n_slash_s(raw: str) -> None:
    try:
        parsed = parse_rate(raw)
    except ConfigError:
        return
    if parsed is None:
        assert not raw.strip()
    else:
        n, s = parsed
        assert n >= 1 and s > 0 and "/" in raw


def _max_overlap(jobs: list[dict[str, Any]]) -> int:
    edges = []
    for job in jobs:
        for i, h in enumerate(job["history"]):
            if h["status"] == "processing":
                edges.append((datetime.fromisoformat(h["at"]), 1))
                edges.append((datetime.fromisoformat(job["history"][i + 1]["at"]), -1))
    running = peak = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    return peak


async def test_one_tenant_s_burst_does_not_starve_another(redis_server: RedisProcess, redis: Redis) -> None:
    settings = make_settings(redis_server.url, tenant_concurrency=2, worker_concurrency=4)
    handle = ServerHandle(settings)
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME, timeout=30) as c:
            burst = [await submit(c, params={"seconds": 0.4, "steps": 1}) for _ in range(12)]
            lone = (await c.post("/jobs", json={"type": "sleep", "params": {"seconds": 0.1}}, headers=GLOBEX)).json()
            async with running_worker(settings), httpx.AsyncClient(base_url=handle.url, headers=GLOBEX) as g:
                globex_job = await wait_for_status(g, lone["id"], "completed")
                acme_jobs = [await wait_for_status(c, t["id"], "completed", timeout=30) for t in burst]
        # Never more than two of acme's jobs at once, across the worker's four slots...
        assert _max_overlap(acme_jobs) == 2
        # ...so globex's job, submitted after all twelve, started while acme's backlog was still
        # waiting: at most the first wave of acme's jobs started before it.
        globex_start = datetime.fromisoformat(globex_job["started_at"])
        started_before = [j for j in acme_jobs if datetime.fromisoformat(j["started_at"]) < globex_start]
        assert len(started_before) <= 2
        assert await redis.scard(schema.TENANT_RUNNING + "acme") == 0
        assert await redis.zcard(schema.TENANT_WAITING + "acme") == 0
    finally:
        await handle.stop()


async def test_a_parked_job_can_be_cancelled(redis_server: RedisProcess, redis: Redis) -> None:
    settings = make_settings(redis_server.url, tenant_concurrency=1)
    handle = ServerHandle(settings)
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME) as c:
            first = await submit(c, params={"seconds": 30, "steps": 30})
            second = await submit(c, params={"seconds": 0})
            async with running_worker(settings):
                await wait_for_status(c, first["id"], "processing")

                async def parked() -> bool:  # the worker takes the second one and parks it
                    return await redis.zcard(schema.TENANT_WAITING + "acme") == 1

                await wait_until(parked, timeout=60)
                assert (await c.get(f"/jobs/{second['id']}")).json()["status"] == "queued"
                cancelled = await c.post(f"/jobs/{second['id']}/cancel")
                assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
                assert await redis.zcard(schema.TENANT_WAITING + "acme") == 0
                await c.post(f"/jobs/{first['id']}/cancel")
                await wait_for_status(c, first["id"], "cancelled")
    finally:
        await handle.stop()


async def _open_stream(
    client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> tuple[Any, httpx.Response]:
    context = client.stream("GET", url, headers=headers)
    response = await context.__aenter__()
    return context, response


async def test_event_streams_are_capped_per_tenant_across_servers(redis_server: RedisProcess, redis: Redis) -> None:
    settings = make_settings(redis_server.url, sse_max_streams_per_tenant=2)
    a, b = ServerHandle(settings), ServerHandle(settings)
    await a.start()
    await b.start()
    try:
        async with httpx.AsyncClient(headers=ACME, timeout=10) as c:
            first, r1 = await _open_stream(c, f"{a.url}/events")
            second, r2 = await _open_stream(c, f"{b.url}/events")
            assert (r1.status_code, r2.status_code) == (200, 200)
            refused = await c.get(f"{a.url}/events")
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            assert "2 event streams" in refused.json()["detail"]
            # Another tenant is not affected.
            other, r3 = await _open_stream(c, f"{b.url}/events", headers=GLOBEX)
            assert r3.status_code == 200
            await other.__aexit__(None, None, None)
            # Closing a stream frees its slot.
            await first.__aexit__(None, None, None)
            await wait_until_status(c, f"{a.url}/events", 200)
            await second.__aexit__(None, None, None)
    finally:
        await a.stop()
        await b.stop()


async def wait_until_status(client: httpx.AsyncClient, url: str, status: int) -> None:
    async with asyncio.timeout(5):
        while True:
            async with client.stream("GET", url) as response:
                if response.status_code == status:
                    return
            await asyncio.sleep(0.05)


async def test_event_streams_are_capped_per_process(redis_server: RedisProcess, redis: Redis) -> None:
    handle = ServerHandle(make_settings(redis_server.url, sse_max_streams=1))
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME, timeout=10) as c:
            held, response = await _open_stream(c, "/events")
            assert response.status_code == 200
            busy = await c.get("/events")
            assert busy.status_code == 503 and busy.headers["retry-after"]
            assert "event streams open" in busy.json()["detail"]
            await held.__aexit__(None, None, None)
    finally:
        await handle.stop()


async def test_long_polls_take_the_slots_of_event_streams(redis_server: RedisProcess, redis: Redis) -> None:
    """A held ``GET /jobs/{id}?wait=`` holds a connection like a stream does, so it counts against
    the same caps: the tenant's (429) and the process's (503)."""
    settings = make_settings(redis_server.url, sse_max_streams_per_tenant=2, sse_max_streams=3)
    handle = ServerHandle(settings)
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME, timeout=60) as c:
            job = await submit(c)  # no worker: it stays queued, so long-polls on it are held
            held = [asyncio.create_task(c.get(f"/jobs/{job['id']}", params={"wait": "50"})) for _ in range(2)]

            async def both_held() -> bool:
                return await redis.zcard(schema.streams_key("acme")) == 2

            await wait_until(both_held)
            refused = await c.get(f"/jobs/{job['id']}", params={"wait": "50"})
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"]
            assert "2 event streams and long-polls" in refused.json()["detail"]
            assert (await c.get(f"/jobs/{job['id']}")).status_code == 200  # a plain read holds nothing
            # Another tenant's long-poll takes the process's last slot; then the process is full.
            other = (await c.post("/jobs", json={"type": "sleep"}, headers=GLOBEX)).json()
            globex_held = asyncio.create_task(c.get(f"/jobs/{other['id']}", params={"wait": "50"}, headers=GLOBEX))

            async def globex_holds() -> bool:
                return await redis.zcard(schema.streams_key("globex")) == 1

            await wait_until(globex_holds)
            busy = await c.get(f"/jobs/{other['id']}", params={"wait": "50"}, headers=GLOBEX)
            assert busy.status_code == 503, busy.text
            # A change answers the held polls and frees their slots.
            assert (await c.post(f"/jobs/{job['id']}/cancel")).status_code == 200
            assert (await c.post(f"/jobs/{other['id']}/cancel", headers=GLOBEX)).status_code == 200
            answers = await asyncio.gather(*held, globex_held)
            assert [a.json()["status"] for a in answers] == ["cancelled"] * 3

            async def released() -> bool:
                return await redis.zcard(schema.streams_key("acme")) == 0

            await wait_until(released)
            assert (await c.get(f"/jobs/{job['id']}", params={"wait": "1"})).status_code == 200
    finally:
        await handle.stop()


async def test_by_default_one_tenant_may_fill_a_tenth_of_the_queue(redis_server: RedisProcess, redis: Redis) -> None:
    """JOBCAST_MAX_QUEUED is global; unless told otherwise each tenant may hold a tenth of it, so one
    tenant cannot lock every other out."""
    async with serving(make_settings(redis_server.url, max_queued=20)) as c:
        assert [(await c.post("/jobs", json={"type": "sleep"})).status_code for _ in range(2)] == [202, 202]
        refused = await c.post("/jobs", json={"type": "sleep"})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"]
        assert "2 jobs queued" in refused.json()["detail"]
        assert "JOBCAST_MAX_QUEUED_PER_TENANT" in refused.json()["detail"]
        assert (await c.post("/jobs", json={"type": "sleep"}, headers=GLOBEX)).status_code == 202
        # A job that leaves the queue makes room.
        first = (await c.get("/jobs")).json()["items"][0]
        assert (await c.post(f"/jobs/{first['id']}/cancel")).status_code == 200
        assert (await c.post("/jobs", json={"type": "sleep"})).status_code == 202


async def test_the_per_tenant_share_can_be_set_or_switched_off(redis_server: RedisProcess, redis: Redis) -> None:
    async with serving(make_settings(redis_server.url, max_queued=4, max_queued_per_tenant=3)) as c:
        codes = [(await c.post("/jobs", json={"type": "sleep"})).status_code for _ in range(4)]
        assert codes == [202, 202, 202, 429]
        assert (await c.post("/jobs", json={"type": "sleep"}, headers=GLOBEX)).status_code == 202
        full = await c.post("/jobs", json={"type": "sleep"}, headers=GLOBEX)  # the global cap still holds
        assert full.status_code == 503, full.text
    await redis.flushall()
    async with serving(make_settings(redis_server.url, max_queued=3, max_queued_per_tenant=0)) as c:
        codes = [(await c.post("/jobs", json={"type": "sleep"})).status_code for _ in range(4)]
        assert codes == [202, 202, 202, 503]


async def test_the_process_stream_cap_holds_against_concurrent_connects(
    redis_server: RedisProcess, redis: Redis
) -> None:
    # The tenant cap (in Redis) is on, so each connect awaits Redis after the process cap's check:
    # a check-then-await-then-count cap lets every one of them through.
    handle = ServerHandle(make_settings(redis_server.url, sse_max_streams=8, sse_max_streams_per_tenant=1000))
    await handle.start()
    try:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME, timeout=30, limits=limits) as c:
            opened = await asyncio.gather(*(_open_stream(c, "/events") for _ in range(40)))
            statuses = sorted(response.status_code for _, response in opened)
            assert statuses == [200] * 8 + [503] * 32
            for context, _ in opened:
                await context.__aexit__(None, None, None)
    finally:
        await handle.stop()


async def test_stream_opens_of_one_loop_turn_go_in_one_pipeline(redis_server: RedisProcess, redis: Redis) -> None:
    """Concurrent stream opens share one round trip (one connection of the pool), each with its own
    outcome: the tenant's cap counted in order, even when Redis has forgotten the script."""
    client = Redis.from_url(redis_server.url, decode_responses=True, client_name="opens")
    script = schema.StreamOpenScript(client)
    try:
        await redis.script_flush()  # every EVALSHA of the pipeline fails NOSCRIPT: each is made again
        log, slots = schema.tenant_log_key("acme"), schema.streams_key("acme")
        keys = [log, slots, log, schema.EPOCH]

        def args(slot: str) -> list[str | int]:
            return ["tenant", "acme", "", "live", 0, 10**13, 60_000, 5, slot, 0]

        outcomes = await asyncio.gather(*(script(keys, args(f"slot{i}")) for i in range(12)))
        assert sorted(outcome for outcome, _, _ in outcomes) == ["full"] * 7 + ["ok"] * 5
        assert await redis.zcard(slots) == 5
        names = [c["name"] for c in await redis.client_list()]
        assert names.count("opens") == 1, names  # one connection: one pipeline, not one call each
        # Loaded now: the next batch goes through without a retry, refusals and all.
        again = await asyncio.gather(*(script(keys, args(f"more{i}")) for i in range(4)))
        assert [outcome for outcome, _, _ in again] == ["full"] * 4
        assert [c["name"] for c in await redis.client_list()].count("opens") == 1
    finally:
        await client.aclose()


def _replay(tenant: str, slot: str = "", cap: int = 0) -> tuple[list[str], list[str | int]]:
    """The keys and arguments of ``streams.lua`` replaying a tenant's log (page of 100)."""
    log = schema.tenant_log_key(tenant)
    keys = [log, schema.streams_key(tenant), log, schema.EPOCH]
    return keys, ["tenant", tenant, "", "replay", 100, 10**13, 60_000, cap, slot, 1000]


async def test_a_batch_after_the_scripts_were_flushed_answers_every_call_as_a_call_of_its_own(
    redis_server: RedisProcess, redis: Redis
) -> None:
    """Every EVALSHA of the pipeline fails NOSCRIPT; each call, made again on its own, gets its own
    reply (not another call's, not the first error)."""
    client = Redis.from_url(redis_server.url, decode_responses=True, client_name="opens")
    script = schema.StreamOpenScript(client)
    tenants = [f"tenant{i}" for i in range(6)]
    try:
        for n, tenant in enumerate(tenants):  # logs of different lengths: every reply differs
            for i in range(n):
                await redis.xadd(schema.tenant_log_key(tenant), {"n": str(i)})
        await script.load()
        expected = [await script(*_replay(tenant)) for tenant in tenants]  # one at a time: no batch
        assert [len(entries) for _, _, entries in expected] == list(range(6))
        await redis.script_flush()
        batched = await asyncio.gather(*(script(*_replay(tenant)) for tenant in tenants))
        assert batched == expected
        assert [c["name"] for c in await redis.client_list()].count("opens") == 1  # it was one pipeline
    finally:
        await client.aclose()


@pytest.mark.parametrize("flushed", [False, True], ids=["loaded", "flushed"])
async def test_a_call_of_a_batch_that_fails_on_its_own_fails_alone(
    redis_server: RedisProcess, redis: Redis, flushed: bool
) -> None:
    """One call of a batch meets a log that is not a stream: the script fails for it in the
    pipeline, and again when it is made on its own. That call gets the error; the others their
    replies (the pipeline's, or their own retry's after SCRIPT FLUSH), tenant slots taken."""
    client = Redis.from_url(redis_server.url, decode_responses=True, client_name="opens")
    script = schema.StreamOpenScript(client)
    try:
        await redis.xadd(schema.tenant_log_key("acme"), {"n": "1"})
        await redis.set(schema.tenant_log_key("broken"), "not a stream")
        await script.load()
        if flushed:
            await redis.script_flush()
        calls = [_replay("acme", "slot-a", cap=5), _replay("broken", "slot-b", cap=5), _replay("acme", "slot-c", cap=5)]
        first, failed, third = await asyncio.gather(*(script(*call) for call in calls), return_exceptions=True)
        assert isinstance(failed, ResponseError) and "WRONGTYPE" in str(failed), failed
        for reply in (first, third):
            assert not isinstance(reply, BaseException), reply
            outcome, _, entries = reply
            assert outcome == "ok" and [fields for _, fields in entries] == [["n", "1"]]
        assert sorted(await redis.zrange(schema.streams_key("acme"), 0, -1)) == ["slot-a", "slot-c"]
        assert await redis.zcard(schema.streams_key("broken")) == 0
        assert [c["name"] for c in await redis.client_list()].count("opens") == 1  # it was one pipeline
    finally:
        await client.aclose()


async def test_an_open_cancelled_in_flight_gives_its_tenant_slot_back(redis_server: RedisProcess, redis: Redis) -> None:
    """A stream opener that goes away after its batched open was sent (the script takes the slot
    anyway) leaves no slot counting against the tenant's cap until it expires."""
    client = Redis.from_url(redis_server.url, decode_responses=True, client_name="opens")
    slots = StreamSlots(client, process=ProcessStreams(100), per_tenant=2, log_max={"job": 1000, "tenant": 1000})
    await slots.open_script.load()
    try:
        await redis.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")  # the scripts write: held
        try:
            a = asyncio.create_task(slots.open_log("tenant", "acme", "acme", None, page=0, slot="slotA"))
            b = asyncio.create_task(slots.open_log("tenant", "acme", "acme", None, page=0, slot="slotB"))
            await wait_until(lambda: held_by_pause(redis))  # the pipeline of both is in Redis
            a.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await a
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        assert (await b)[0] == "ok"
        await schema.settle_batches(10)
        await slots.settle(10)  # the removals queued meanwhile are done
        assert await redis.zrange(schema.streams_key("acme"), 0, -1) == ["slotB"]
        third = await slots.open_log("tenant", "acme", "acme", None, page=0, slot="slotC")
        assert third[0] == "ok"
    finally:
        await client.aclose()


async def test_shutdown_waits_for_the_batched_opens_under_way(redis_server: RedisProcess, redis: Redis) -> None:
    """settle_batches (the app's shutdown, before the Redis clients are closed) lets a batch of
    opens that Redis holds finish: its caller gets its outcome, nothing is left running."""
    client = Redis.from_url(redis_server.url, decode_responses=True, client_name="opens")
    slots = StreamSlots(client, process=ProcessStreams(100), per_tenant=2, log_max={"job": 1000, "tenant": 1000})
    await slots.open_script.load()
    try:
        await redis.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            opening = asyncio.create_task(slots.open_log("tenant", "acme", "acme", None, page=0, slot="slotA"))
            await wait_until(lambda: held_by_pause(redis))
            settling = asyncio.create_task(schema.settle_batches(30))
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        await settling
        assert not schema._batches
        assert (await opening)[0] == "ok"
    finally:
        await client.aclose()
