"""Webhook destinations: per-destination rate, Retry-After pauses, in-flight caps, health.

Real receivers on loopback (so JOBCAST_WEBHOOK_ALLOW_PRIVATE=1), real Redis, a real delivery worker.
Nothing here asserts that something is fast; the rate is checked by bounds that a slower machine can
only satisfy more easily (a delivery is never sent before its turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from arq.connections import RedisSettings, create_pool
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.connections import redis_for
from jobcast.worker.delivery import DeliveryWorker
from jobcast.worker.destinations import DestinationStore, destination_of, rate_home
from jobcast.worker.models import Priority
from jobcast.worker.rates import parse_rates
from jobcast.worker.settings import ConfigError, Settings
from jobcast.worker.store import Store
from jobcast.worker.webhooks import WebhookStore

from .conftest import (
    GLOBEX,
    ServerHandle,
    deliveries,
    make_settings,
    redis_cells,
    running_worker,
    submit,
    wait_for_deliveries,
    wait_until,
)
from .receiver import Receiver, Reply
from .test_commands import jobcast

QUICK = {"seconds": 0, "steps": 1}


@pytest.fixture
def settings(redis_server: RedisProcess) -> Settings:
    return make_settings(
        redis_server.url, webhook_allow_private=True, webhook_retry_schedule="0.2,0.4,0.6", webhook_timeout_s=5
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@contextlib.asynccontextmanager
async def delivering(settings: Settings, redis: Redis, cell: int = 0) -> AsyncIterator[DeliveryWorker]:
    """Only the delivery worker of cell ``cell`` (no job runner): the deliveries of jobs created by
    ``store.create``."""
    pool = await create_pool(RedisSettings.from_dsn(settings.cell_urls[cell]))
    worker = DeliveryWorker(settings, redis=redis, pool=pool, cell=cell)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        await worker.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.aclose()


async def queue_deliveries(store: Store, url: str, count: int, tenant: str = "acme") -> list[str]:
    """``count`` jobs whose webhook wants job.queued: one delivery each, queued at creation."""
    ids = []
    for _ in range(count):
        created = await store.create(
            tenant=tenant,
            job_type="sleep",
            params={},
            priority=Priority.NORMAL,
            max_attempts=1,
            webhook={"url": url, "events": ["job.queued"]},
        )
        assert created.job_id is not None
        ids.append(created.job_id)
    return ids


async def metric(client: httpx.AsyncClient, line_start: str) -> float:
    text = (await client.get("/metrics")).text
    [line] = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


# --- what a destination is ------------------------------------------------------------------------


async def test_the_script_and_python_agree_on_destinations(store: Store, redis: Redis) -> None:
    urls = [
        "http://Example.COM/x",
        "https://a.example:8443/p?q=1",
        "http://[::1]:9/x",
        "http://[::1]/",
        "https://h.example",
        "http://h.example:80/",
        "HTTPS://H.example:443?x",
    ]
    expected = [
        "http://example.com:80",
        "https://a.example:8443",
        "http://[::1]:9",
        "http://[::1]:80",
        "https://h.example:443",
        "http://h.example:80",
        "https://h.example:443",
    ]
    assert [destination_of(u) for u in urls] == expected
    for url, destination in zip(urls, expected, strict=True):
        [job_id] = await queue_deliveries(store, url, 1)
        [wid] = await redis.lrange(schema.job_deliveries_key(job_id), 0, -1)
        assert await redis.hget(schema.delivery_key(wid), "destination") == destination


def test_rate_overrides_are_parsed_and_checked(redis_server: RedisProcess) -> None:
    rates = parse_rates(" https://Hooks.example=10/1, http://10.0.0.5:8080=2/0.5 ")
    assert {name: str(rate) for name, rate in rates.items()} == {
        "https://hooks.example:443": "10/1",
        "http://10.0.0.5:8080": "2/0.5",
    }
    for bad in ("hooks.example=10/1", "https://h.example=10", "https://h'x.example=1/1", "https://h.example=0/1"):
        with pytest.raises(ConfigError, match="JOBCAST_WEBHOOK_RATES"):
            make_settings(redis_server.url, webhook_rates=bad)
    with pytest.raises(ConfigError, match="JOBCAST_WEBHOOK_RATE"):
        make_settings(redis_server.url, webhook_rate="fast")


# --- rate ------------------------------------------------------------------------------------------


async def test_an_attempt_handed_out_before_its_reserved_turn_waits_for_it(
    settings: Settings, store: Store, redis: Redis, receiver: Receiver
) -> None:
    """The queue hands attempts out by the millisecond it rounds to, which can be before the turn the
    destination's rate reserved: admitted then, it waits out the rest instead of leaving early."""
    local = settings.model_copy(update={"webhook_rates": f"{receiver.origin}=1/10"})  # one per 10 s
    first, second = await queue_deliveries(Store(redis, local), receiver.url, 2)
    webhooks = WebhookStore(redis, local)
    [early] = await webhooks.for_job(second)
    delivery = await webhooks.get(early["id"])
    assert delivery is not None and early["wait_reason"] == "rate_limit"
    verdict = await webhooks.admit(delivery, 30.0)  # as if its attempt came up now, 10 s early
    assert verdict[0] == "wait" and verdict[2] == "rate_limit", verdict
    assert int(verdict[1]) > int(time.time() * 1000) + 5_000, verdict  # still its reserved turn
    [again] = await webhooks.for_job(second)
    assert again["status"] == "pending" and again["wait_reason"] == "rate_limit"
    [sent] = await webhooks.for_job(first)
    delivery = await webhooks.get(sent["id"])
    assert delivery is not None and (await webhooks.admit(delivery, 30.0))[0] == "send"


async def test_a_burst_of_500_is_spread_at_the_rate_with_none_lost(
    settings: Settings, store: Store, redis: Redis, receiver: Receiver, client: httpx.AsyncClient
) -> None:
    burst, per_s = 100, 0.5  # 100 at once, then one every 5 ms
    interval = per_s / burst
    rates = f"{receiver.origin}={burst}/{per_s}"
    local = settings.model_copy(update={"webhook_rate": "1000/1", "webhook_rates": rates})
    started = time.monotonic()
    job_ids = await queue_deliveries(Store(redis, local), receiver.url, 500)

    # Nothing is sent yet, and the wait already shows: the last one waits its turn behind 399 others.
    [last] = await deliveries(client, job_ids[-1])
    assert last["status"] == "pending" and last["wait_reason"] == "rate_limit"
    assert last["destination"] == receiver.origin
    assert last["next_attempt_at"] > last["created_at"]
    [first] = await deliveries(client, job_ids[0])
    assert first["wait_reason"] is None
    # Held back: all but the burst, less the few the bucket refilled for while the 500 were written.
    assert 0 < await metric(client, 'jobcast_webhook_deferrals_total{reason="rate_limit"}') <= 500 - burst

    async with delivering(local, redis):
        received = await receiver.wait_for(500, timeout=60)
        for job_id in (job_ids[0], job_ids[-1]):
            await wait_for_deliveries(client, job_id, "delivered")
    assert len({r.headers["webhook-id"] for r in received}) == 500  # none lost, none twice
    # A delivery is never sent before its turn: by any moment, at most the burst plus one per interval.
    for k, request in enumerate(sorted(received, key=lambda r: r.at)):
        assert k < burst + (request.at - started) / interval + 2, (k, request.at - started)
    assert received[-1].at - started >= (500 - burst - 1) * interval


async def test_a_job_s_deliveries_keep_their_order_under_the_rate(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    local = settings.model_copy(
        update={"webhook_rates": f"{receiver.origin}=1/0.05", "webhook_destination_concurrency": 1}
    )
    async with running_worker(local):
        await run_a_job_with_every_event_to(Store(redis, local), receiver, "acme")
    assert_in_event_order(receiver)


async def run_a_job_with_every_event_to(store: Store, receiver: Receiver, tenant: str) -> None:
    """Create a job of 4 progress steps whose webhook wants every event; wait for its job.completed."""
    await store.create(
        tenant=tenant,
        job_type="sleep",
        params={"seconds": 0.4, "steps": 4},
        priority=Priority.NORMAL,
        max_attempts=1,
        webhook={"url": receiver.url, "events": ["job.queued", "job.processing", "job.progress", "job.completed"]},
    )

    async def completed() -> bool:
        return any(b'"job.completed"' in r.body for r in receiver.requests)

    await wait_until(completed, timeout=20)


def assert_in_event_order(receiver: Receiver) -> None:
    bodies = [orjson.loads(r.body) for r in receiver.requests]
    kinds = [b["type"] for b in bodies]
    assert kinds[:2] == ["job.queued", "job.processing"] and kinds[-1] == "job.completed"
    assert set(kinds[2:-1]) == {"job.progress"}  # progress may be coalesced, never reordered
    percents = [b["data"]["progress"]["percent"] for b in bodies[2:-1]]
    assert percents == sorted(set(percents)) and percents[-1] == 100.0
    assert bodies[2]["data"]["progress"]["step"].startswith("step ")
    assert "params" not in bodies[2]["data"] and "result" not in bodies[2]["data"]  # still thin


async def test_a_429_with_retry_after_slows_the_whole_destination(
    settings: Settings, store: Store, redis: Redis, receiver: Receiver, client: httpx.AsyncClient
) -> None:
    receiver.replies = [Reply(429, {"Retry-After": "2"})]
    local = settings.model_copy(update={"webhook_destination_concurrency": 1})
    await queue_deliveries(Store(redis, local), receiver.url, 3)
    async with delivering(local, redis):
        received = await receiver.wait_for(4, timeout=20)  # the 429, two others, the 429'd again
    first, second = received[0], received[1]
    # The other deliveries were held back too, not only the one that got the 429.
    assert second.at - first.at >= 1.95
    assert await metric(client, 'jobcast_webhook_deferrals_total{reason="retry_after"}') >= 1


# --- one slow destination never delays the others ------------------------------------------------


async def test_a_hanging_destination_does_not_delay_a_healthy_one(
    settings: Settings, store: Store, redis: Redis, receiver: Receiver, client: httpx.AsyncClient
) -> None:
    slow = await Receiver().start()
    slow.default = Reply(hang=True)
    local = settings.model_copy(
        update={"webhook_concurrency": 4, "webhook_destination_concurrency": 2, "webhook_timeout_s": 60}
    )
    try:
        slow_jobs = await queue_deliveries(Store(redis, local), slow.url, 10)
        async with delivering(local, redis):
            await slow.wait_for(2)
            await queue_deliveries(Store(redis, local), receiver.url, 10)
            received = await receiver.wait_for(10, timeout=20)  # all four slots hung: it would wait 60 s
            assert len(received) == 10
            assert len(slow.requests) == 2  # at most 2 in flight to it; the rest wait their turn

            async def busy() -> bool:
                items = await deliveries(client, slow_jobs[-1])
                return items[0]["wait_reason"] == "destination_busy"

            await wait_until(busy)
    finally:
        await slow.stop()


# --- health ------------------------------------------------------------------------------------------


async def test_a_failing_destination_is_disabled_then_enabled_again(
    settings: Settings, redis: Redis, receiver: Receiver, client: httpx.AsyncClient, server: ServerHandle
) -> None:
    receiver.default = Reply(500)
    local = settings.model_copy(
        update={"webhook_disable_after_s": 0.5, "webhook_retry_schedule": ",".join(["0.2"] * 20)}
    )
    destination = receiver.origin
    async with running_worker(local):
        ticket = await submit(client, params=QUICK, webhook={"url": receiver.url})

        async def disabled() -> dict[str, Any] | None:
            items = (await client.get("/webhooks/destinations")).json()["items"]
            return items[0] if items and items[0]["state"] == "disabled" else None

        entry = await wait_until(disabled)
        assert entry["destination"] == destination and entry["consecutive_failures"] >= 2
        assert entry["last_success_at"] is None and entry["last_error"] == "HTTP 500"
        assert entry["failing_since"] < entry["disabled_at"]
        [dead] = await wait_for_deliveries(client, ticket["id"], "dead")  # its pending retry, too
        assert await metric(client, 'jobcast_webhook_destinations_disabled{tenant="acme"}') == 1

        # A new delivery to it is dead-lettered at once, unsent, saying why.
        sent = len(receiver.requests)
        second = await submit(client, params=QUICK, webhook={"url": receiver.url})
        [unsent] = await wait_for_deliveries(client, second["id"], "dead")
        assert unsent["attempts"] == [] and len(receiver.requests) == sent
        letters = {d["id"]: d for d in (await client.get("/webhooks/dead-letters")).json()["items"]}
        assert letters[unsent["id"]]["reason"] == "disabled"
        assert "is disabled" in letters[unsent["id"]]["last_error"]
        assert "/enable" in letters[unsent["id"]]["last_error"]
        assert letters[dead["id"]]["reason"] == "disabled"

        # Another tenant neither sees nor enables it.
        async with httpx.AsyncClient(base_url=server.url, headers=GLOBEX) as globex:
            assert (await globex.get("/webhooks/destinations")).json() == {"items": []}
            path = f"/webhooks/destinations/{quote(destination, safe='')}/enable"
            assert (await globex.post(path)).status_code == 404
        assert (await client.get("/webhooks/destinations", params={"limit": 0})).status_code == 400
        for bad in ("nope", "ftp://x", "http://unknown.example", "%00", "http://" + "a" * 400):
            response = await client.post(f"/webhooks/destinations/{quote(bad, safe='')}/enable")
            assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"

        receiver.default = Reply(204)
        enabled = await client.post(f"/webhooks/destinations/{quote(destination, safe='')}/enable")
        assert enabled.status_code == 200, enabled.text
        assert enabled.json()["state"] == "enabled" and enabled.json()["consecutive_failures"] == 0
        assert "jobcast_webhook_destinations_disabled{" not in (await client.get("/metrics")).text
        assert (await client.post(f"/webhooks/dead-letters/{unsent['id']}/replay")).status_code == 202
        [replayed] = await wait_for_deliveries(client, second["id"], "delivered")
        assert [a["status_code"] for a in replayed["attempts"]] == [204]
        entry = (await client.get("/webhooks/destinations")).json()["items"][0]
        assert entry["state"] == "enabled" and entry["last_success_at"] is not None and entry["delivered"] == 1


async def test_the_cli_lists_and_enables_destinations(
    settings: Settings, redis: Redis, receiver: Receiver, server: ServerHandle
) -> None:
    store = Store(redis, settings)
    await queue_deliveries(store, receiver.url, 1)
    health = schema.destination_health_key("acme", receiver.origin)
    await redis.hset(health, mapping={"state": "disabled", "failures": 3, "last_error": "HTTP 500"})
    run = await jobcast(server.url, "destinations", "--json")
    assert run.status == 0, run.stderr
    [listed] = orjson.loads(run.stdout)["items"]
    assert listed["destination"] == receiver.origin and listed["state"] == "disabled"
    text = await jobcast(server.url, "destinations")
    assert receiver.origin in text.stdout and "disabled" in text.stdout
    run = await jobcast(server.url, "enable-destination", receiver.origin)
    assert run.status == 0 and "enabled" in run.stdout, run.stderr
    assert await redis.hget(health, "state") == "enabled"
    missing = await jobcast(server.url, "enable-destination", "http://nowhere.example")
    assert missing.status == 4 and "No destination" in missing.stderr


# --- payloads ---------------------------------------------------------------------------------------


async def test_links_are_absolute_with_a_public_url(
    settings: Settings, redis: Redis, receiver: Receiver, client: httpx.AsyncClient
) -> None:
    local = settings.model_copy(update={"public_url": "https://jobs.example.com/api"})
    async with running_worker(local):
        ticket = await submit(client, params=QUICK, webhook={"url": receiver.url})
        [request] = await receiver.wait_for(1)
    links = orjson.loads(request.body)["data"]["links"]
    assert links["self"] == f"https://jobs.example.com/api/jobs/{ticket['id']}"
    assert links["result"] == f"https://jobs.example.com/api/jobs/{ticket['id']}/result"


async def test_deliveries_to_a_disabled_destination_are_dead_lettered_at_once_not_in_turn(
    settings: Settings, redis: Redis, receiver: Receiver, client: httpx.AsyncClient
) -> None:
    local = settings.model_copy(update={"webhook_rates": f"{receiver.origin}=1/60"})  # one a minute
    await redis.hset(schema.destination_health_key("acme", receiver.origin), mapping={"state": "disabled"})
    job_ids = await queue_deliveries(Store(redis, local), receiver.url, 5)
    async with delivering(local, redis):
        for job_id in job_ids:
            [dead] = await wait_for_deliveries(client, job_id, "dead")
            assert dead["attempts"] == []
    letters = (await client.get("/webhooks/dead-letters")).json()["items"]
    assert len(letters) == 5 and {letter["reason"] for letter in letters} == {"disabled"}
    assert receiver.connections == 0


# --- rate across cells -----------------------------------------------------------------------------


def two_cells_settings(cells: list[RedisProcess], receiver: Receiver, rate: str) -> Settings:
    """Two cells (globex in cell 0, acme in cell 1), ``rate`` for the receiver."""
    settings = make_settings(
        "",
        redis_urls=",".join(cell.url for cell in cells),
        cell_placement="globex=0,acme=1",
        webhook_allow_private=True,
        webhook_retry_schedule="0.2,0.4,0.6",
        webhook_timeout_s=5,
        webhook_rates=f"{receiver.origin}={rate}",
    )
    return settings


async def delivered_everywhere(stores: list[WebhookStore], job_ids: list[list[str]]) -> bool:
    """Whether every delivery of the jobs (``job_ids[cell]``) is delivered."""
    for store, ids in zip(stores, job_ids, strict=True):
        for job_id in ids:
            if [d["status"] for d in await store.for_job(job_id)] != ["delivered"]:
                return False
    return True


async def test_a_destination_s_rate_holds_across_cells_with_none_lost(tmp_path: Path, receiver: Receiver) -> None:
    burst, per_s, each = 5, 0.5, 30  # 10 a second for the whole deployment; 30 deliveries from each cell
    interval = per_s / burst
    with redis_cells(tmp_path, 2) as cells:
        settings = two_cells_settings(cells, receiver, f"{burst}/{per_s}")
        redis = [redis_for(cell.url) for cell in cells]
        try:
            started = time.monotonic()  # before the first delivery is written (or its turn reserved)
            job_ids = [
                await queue_deliveries(Store(client, settings, cell=cell), receiver.url, each, tenant=tenant)
                for cell, (client, tenant) in enumerate(zip(redis, ("globex", "acme"), strict=True))
            ]
            async with delivering(settings, redis[0], cell=0), delivering(settings, redis[1], cell=1):
                received = await receiver.wait_for(2 * each, timeout=60)
                stores = [WebhookStore(client, settings, cell=cell) for cell, client in enumerate(redis)]
                await wait_until(lambda: delivered_everywhere(stores, job_ids), timeout=30)
        finally:
            for client in redis:
                await client.aclose()
    assert len({r.headers["webhook-id"] for r in received}) == 2 * each  # none lost, none twice
    # By any moment the receiver saw at most the burst plus one per interval since the start, from
    # both cells together: a delivery is never sent before its turn (a slow machine only sends later).
    for k, request in enumerate(sorted(received, key=lambda r: r.at)):
        assert k < burst + (request.at - started) / interval + 2, (k, request.at - started)


async def test_a_delivery_waits_while_its_destination_s_rate_cell_is_down_and_goes_after(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_cells(tmp_path, 2) as cells:
        settings = two_cells_settings(cells, receiver, "5/1")
        home = rate_home(receiver.origin, 2)
        cell = 1 - home  # the delivery's cell: not the one that keeps the destination's rate
        redis = redis_for(cells[cell].url)
        caplog.set_level(logging.INFO, logger="jobcast.worker.destinations")
        try:
            store = Store(redis, settings, cell=cell)
            [job_id] = await queue_deliveries(store, receiver.url, 1, tenant=("globex", "acme")[cell])
            webhooks = WebhookStore(redis, settings, cell=cell)
            [item] = await webhooks.for_job(job_id)
            cells[home].stop()
            async with delivering(settings, redis, cell=cell):

                async def waiting() -> bool:
                    delivery = await webhooks.get(item["id"])
                    return delivery is not None and delivery.wait_reason == "rate_home_unreachable"

                await wait_until(waiting, timeout=30)
                assert receiver.requests == []  # never sent without a turn
                assert (await DestinationStore(redis, settings, cell).wait_counts())["count|rate_home_unreachable"] >= 1
                cells[home].start()  # the same port
                await receiver.wait_for(1, timeout=30)
                await wait_until(lambda: delivered_everywhere([webhooks], [[job_id]]), timeout=30)
            # One WARNING for the outage (later waits log at DEBUG), naming the job and the cell; one
            # INFO when the cell answers again.
            ours = [r for r in caplog.records if r.name == "jobcast.worker.destinations"]
            [warning] = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
            assert f"cell {home}, which keeps this destination's rate, did not answer" in warning and job_id in warning
            assert any(r.getMessage().startswith(f"cell {home} answers again") for r in ours)
            assert [r.headers["webhook-id"] for r in receiver.requests] == [item["id"]]
        finally:
            await redis.aclose()


async def test_a_job_s_deliveries_keep_their_order_under_a_rate_kept_by_another_cell(
    tmp_path: Path, receiver: Receiver
) -> None:
    with redis_cells(tmp_path, 2) as cells:
        settings = two_cells_settings(cells, receiver, "1/0.05").model_copy(
            update={"webhook_destination_concurrency": 1}
        )
        home = rate_home(receiver.origin, 2)
        cell = 1 - home  # each turn is asked of the other cell
        redis = [redis_for(c.url) for c in cells]
        try:
            async with running_worker(settings, cell=cell):
                store = Store(redis[cell], settings, cell=cell)
                await run_a_job_with_every_event_to(store, receiver, ("globex", "acme")[cell])
            # The turns were taken in the home cell, none in the job's.
            assert await redis[home].hexists(schema.destination_key(receiver.origin, cell=home), "tat")
            assert not await redis[cell].hexists(schema.destination_key(receiver.origin, cell=cell), "tat")
        finally:
            for client in redis:
                await client.aclose()
    assert_in_event_order(receiver)
