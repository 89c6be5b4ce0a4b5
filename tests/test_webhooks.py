"""Webhook deliveries end to end: real server, real workers, real receivers on loopback.

Receivers listen on 127.0.0.1, so these tests run with JOBCAST_WEBHOOK_ALLOW_PRIVATE=1 — the SSRF
guard itself is tested in test_egress.py. Signatures are verified with the reference
``standardwebhooks`` library, never with our own code.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import signal
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import httpx
import orjson
import pytest
from arq.constants import job_key_prefix as arq_job_key_prefix
from arq.constants import retry_key_prefix as arq_retry_key_prefix
from arq.jobs import deserialize_job_raw
from pydantic import ValidationError
from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.delivery import (
    MAX_RUNS,
    MAX_TRIES,
    RETRY_AFTER_MAX_S,
    Answer,
    DeliveryBusy,
    Dispatcher,
    Sender,
    next_step,
    parse_retry_after,
    put_off_s,
)
from jobcast.worker.main import JobcastWorker
from jobcast.worker.models import Priority
from jobcast.worker.settings import ConfigError, Settings
from jobcast.worker.signatures import decode_secret, sign
from jobcast.worker.store import Store
from jobcast.worker.webhooks import Delivery, PutOff, WebhookStore

from .conftest import (
    GLOBEX,
    WEBHOOK_SECRET_ACME,
    WEBHOOK_SECRET_GLOBEX,
    ServerHandle,
    deliveries,
    make_settings,
    running_worker,
    serving,
    submit,
    wait_for_deliveries,
    wait_for_status,
    wait_until,
)
from .receiver import Received, Receiver, Reply

SCHEDULE = "0.2,0.4,0.6"
QUICK = {"seconds": 0, "steps": 1}
WEBHOOK_ID = re.compile(r"^msg_[0-9A-Z]{26}_\d+-\d+$")


@pytest.fixture
def settings(redis_server: RedisProcess) -> Settings:
    return make_settings(
        redis_server.url, webhook_allow_private=True, webhook_retry_schedule=SCHEDULE, webhook_timeout_s=2
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def verify(request: Received, secret: str = WEBHOOK_SECRET_ACME) -> Any:
    return Webhook(secret).verify(request.body, request.headers)


def gaps(requests: list[Received]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(requests)]


# --- what is sent --------------------------------------------------------------------------------


async def test_a_completed_job_is_delivered_signed_and_thin(
    client: httpx.AsyncClient, worker: JobcastWorker, receiver: Receiver
) -> None:
    ticket = await submit(client, params=QUICK, webhook={"url": receiver.url + "?tag=7#fragment"})
    url = receiver.url + "?tag=7"  # the fragment is never sent, so it is not kept
    assert ticket["webhook"] == {"url": url, "events": ["job.completed", "job.failed", "job.cancelled"]}
    assert ticket["links"]["deliveries"] == f"/jobs/{ticket['id']}/deliveries"
    job = await wait_for_status(client, ticket["id"], "completed")
    [request] = await receiver.wait_for(1)

    payload = verify(request)  # the reference library accepts the signature, id and timestamp
    assert request.method == "POST" and request.path == "/hook?tag=7"
    assert request.headers["content-type"] == "application/json"
    assert WEBHOOK_ID.match(request.headers["webhook-id"])
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 10
    base = f"/jobs/{job['id']}"
    assert payload == {
        "type": "job.completed",
        "timestamp": job["finished_at"],
        "data": {
            "job_id": job["id"],
            "status": "completed",
            "links": {"self": base, "events": base + "/events", "cancel": base + "/cancel", "result": base + "/result"},
        },
    }
    assert b"slept" not in request.body and b"seconds" not in request.body  # no result, no params

    [delivery] = await wait_for_deliveries(client, job["id"], "delivered")
    assert delivery["id"] == request.headers["webhook-id"]
    assert delivery["event"] == "job.completed" and delivery["url"] == url
    assert delivery["next_attempt_at"] is None and delivery["finished_at"] is not None
    [attempt] = delivery["attempts"]
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["duration_ms"] >= 0


async def test_an_ipv6_receiver_gets_a_bracketed_host_header(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    receiver = await Receiver("::1").start()
    try:
        await submit(client, params=QUICK, webhook={"url": receiver.url})
        [request] = await receiver.wait_for(1)
        assert request.headers["host"] == f"[::1]:{receiver.port}"
        assert verify(request)["type"] == "job.completed"
    finally:
        await receiver.stop()


async def test_the_events_asked_for_are_delivered_each_with_its_own_id(
    client: httpx.AsyncClient, worker: JobcastWorker, receiver: Receiver
) -> None:
    events = ["job.queued", "job.processing", "job.progress", "job.completed", "job.queued"]
    ticket = await submit(client, params={"seconds": 0.2, "steps": 2}, webhook={"url": receiver.url, "events": events})
    assert ticket["webhook"]["events"] == ["job.queued", "job.processing", "job.progress", "job.completed"]
    await wait_for_status(client, ticket["id"], "completed")
    items = await wait_for_deliveries(client, ticket["id"], "delivered", count=5)  # 2 progress events
    expected = ["job.queued", "job.processing", "job.progress", "job.progress", "job.completed"]
    assert [i["event"] for i in items] == expected
    received = await receiver.wait_for(5)
    assert sorted(verify(r)["type"] for r in received) == sorted(i["event"] for i in items)
    assert {r.headers["webhook-id"] for r in received} == {i["id"] for i in items}  # five distinct ids


async def test_a_cancelled_queued_job_is_delivered_too(
    client: httpx.AsyncClient, settings: Settings, receiver: Receiver
) -> None:
    ticket = await submit(client, params={"seconds": 5}, webhook={"url": receiver.url})
    assert (await client.post(f"/jobs/{ticket['id']}/cancel")).status_code == 200
    async with running_worker(settings):
        [request] = await receiver.wait_for(1)
    payload = verify(request)
    assert payload["type"] == "job.cancelled" and payload["data"]["status"] == "cancelled"


def test_signatures_match_the_reference_library_during_a_rotation() -> None:
    new = "whsec_" + base64.b64encode(b"acme-webhook-signing-key-rotated").decode()
    body = b'{"type":"job.completed"}'
    now = int(time.time())
    header = sign([decode_secret(WEBHOOK_SECRET_ACME), decode_secret(new)], "msg_1", now, body)
    assert header.count("v1,") == 2 and " " in header
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": header}
    for secret in (WEBHOOK_SECRET_ACME, new, new.removesuffix("=")):  # unpadded secrets work too
        assert Webhook(secret).verify(body, headers) == {"type": "job.completed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET_GLOBEX).verify(body, headers)


def test_a_tenant_s_several_secrets_all_sign_and_others_fall_back(redis_server: RedisProcess) -> None:
    new = "whsec_" + base64.b64encode(b"acme-webhook-signing-key-rotated").decode()
    fallback = "whsec_" + base64.b64encode(b"fallback-webhook-signing-key-012").decode()
    settings = make_settings(
        redis_server.url, webhook_secrets=f"acme:{WEBHOOK_SECRET_ACME}, acme:{new}", webhook_secret=fallback
    )
    assert settings.webhook_keys_for("acme") == [decode_secret(WEBHOOK_SECRET_ACME), decode_secret(new)]
    assert settings.webhook_keys_for("globex") == [decode_secret(fallback)]
    assert make_settings(redis_server.url, webhook_secrets="").webhook_keys_for("acme") == []


@pytest.mark.parametrize(
    ("overrides", "mention"),
    [
        ({"webhook_secrets": "acme:secret"}, "whsec_"),
        ({"webhook_secrets": "acme:whsec_not*base64"}, "base64"),
        ({"webhook_secret": "whsec_" + base64.b64encode(b"short").decode()}, "24 bytes"),
        ({"webhook_secrets": "no-colon"}, "tenant:value"),
    ],
)
def test_malformed_webhook_secrets_are_a_startup_error(
    redis_server: RedisProcess, overrides: dict[str, str], mention: str
) -> None:
    with pytest.raises(ConfigError, match=mention) as raised:
        make_settings(redis_server.url, **overrides)
    assert "JOBCAST_WEBHOOK_SECRET" in str(raised.value)


def test_a_malformed_retry_schedule_is_a_startup_error(redis_server: RedisProcess) -> None:
    with pytest.raises(ValidationError, match="JOBCAST_WEBHOOK_RETRY_SCHEDULE"):
        make_settings(redis_server.url, webhook_retry_schedule="5,soon")
    assert make_settings(redis_server.url, webhook_retry_schedule=" 1, 2.5 ,").webhook_retry_delays == [1.0, 2.5]


async def test_a_tenant_without_a_signing_secret_cannot_submit_a_webhook(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    only_acme = settings.model_copy(update={"webhook_secrets": f"acme:{WEBHOOK_SECRET_ACME}"})
    async with serving(only_acme, GLOBEX) as globex:
        response = await globex.post("/jobs", json={"type": "sleep", "webhook": {"url": receiver.url}})
        assert response.status_code == 422, response.text
        assert "JOBCAST_WEBHOOK_SECRETS" in response.json()["detail"]
        assert response.json()["errors"][0]["loc"] == ["body", "webhook"]
        assert (await globex.get("/jobs")).json()["items"] == []
        assert (await globex.post("/jobs", json={"type": "sleep"})).status_code == 202  # without: fine


async def test_deliveries_are_queued_in_the_same_step_as_their_events(store: Store, redis: Redis) -> None:
    webhook = {"url": "http://127.0.0.1:9/hook", "events": ["job.queued", "job.cancelled"]}
    created = await store.create(
        tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1, webhook=webhook
    )
    assert created.job_id is not None
    await store.cancel(created.job_id, "acme")  # no worker runs: only the script wrote anything
    sids = [sid for sid, _ in await redis.xrange(schema.job_log_key(created.job_id))]
    ids = [f"msg_{created.job_id.removeprefix('job_')}_{sid}" for sid in sids]
    assert await redis.lrange(schema.job_deliveries_key(created.job_id), 0, -1) == ids
    assert await redis.zrange(schema.WEBHOOK_QUEUE, 0, -1) == [schema.attempt_id(wid, 1) for wid in ids]
    for wid in ids:  # in arq's own job format, as arq reads it
        payload = await redis.get(arq_job_key_prefix + schema.attempt_id(wid, 1))
        function, args, kwargs, _, _ = deserialize_job_raw(payload.encode(), deserializer=orjson.loads)
        assert (function, args, kwargs) == (schema.DELIVER_FUNCTION, [wid, 1], {})


# --- retries, dead letters, replay ----------------------------------------------------------------


async def test_failures_retry_with_increasing_gaps_then_dead_letter_then_replay(
    client: httpx.AsyncClient, worker: JobcastWorker, receiver: Receiver, redis: Redis, settings: Settings
) -> None:
    receiver.default = Reply(500)
    ticket = await submit(client, params=QUICK, webhook={"url": receiver.url})
    [delivery] = await wait_for_deliveries(client, ticket["id"], "dead")
    received = await receiver.wait_for(4)
    assert len(received) == 4  # the first try and one per delay of "0.2,0.4,0.6"
    assert len({r.headers["webhook-id"] for r in received}) == 1  # stable across retries
    assert all(verify(r)["type"] == "job.completed" for r in received)  # each attempt freshly signed
    first, second, third = gaps(received)
    assert first < second < third
    assert first >= 0.2 * 0.9 and second >= 0.4 * 0.9 and third >= 0.6 * 0.9  # never sooner (jitter ±10 %)
    assert [a["status_code"] for a in delivery["attempts"]] == [500] * 4
    assert all(a["error"] == "HTTP 500" for a in delivery["attempts"])

    listed = (await client.get("/webhooks/dead-letters")).json()["items"]
    assert listed == [
        {
            "id": delivery["id"],
            "job_id": ticket["id"],
            "event": "job.completed",
            "url": receiver.url,
            "attempts": 4,
            "last_error": "HTTP 500",
            "reason": "failed",
            "dead_at": delivery["finished_at"],
            "links": {"replay": f"/webhooks/dead-letters/{delivery['id']}/replay", "job": f"/jobs/{ticket['id']}"},
        }
    ]
    store = WebhookStore(redis, settings)  # what /metrics will read
    assert await store.dead_letter_count("acme") == 1 and await store.dead_letter_count("globex") == 0
    assert await store.outcome_counts() == {"retry": 3, "dead": 1}

    receiver.default = Reply(204)
    replay = await client.post(f"/webhooks/dead-letters/{delivery['id']}/replay")
    assert replay.status_code == 202, replay.text
    assert replay.json()["status"] == "pending" and replay.headers["location"] == f"/jobs/{ticket['id']}/deliveries"
    [replayed] = await wait_for_deliveries(client, ticket["id"], "delivered")
    assert receiver.requests[4].headers["webhook-id"] == delivery["id"]  # same webhook-id
    assert replayed["replays"] == 1 and [a["status_code"] for a in replayed["attempts"]] == [500] * 4 + [204]
    assert (await client.get("/webhooks/dead-letters")).json()["items"] == []
    assert await store.dead_letter_count("acme") == 0
    assert await store.outcome_counts() == {"retry": 3, "dead": 1, "delivered": 1}
    again = await client.post(f"/webhooks/dead-letters/{delivery['id']}/replay")
    assert again.status_code == 404  # no longer a dead letter


async def test_retry_after_is_honoured_in_seconds_and_as_a_date(
    client: httpx.AsyncClient, worker: JobcastWorker, receiver: Receiver
) -> None:
    receiver.replies = [
        Reply(429, {"Retry-After": "1"}),
        # Set now, served after the first attempt and its 1 s wait (more under a loaded machine).
        Reply(503, {"Retry-After": formatdate(time.time() + 8, usegmt=True)}),
        Reply(200),
    ]
    ticket = await submit(client, params=QUICK, webhook={"url": receiver.url})
    [delivery] = await wait_for_deliveries(client, ticket["id"], "delivered", timeout=15)
    first, second = gaps(await receiver.wait_for(3))
    assert first >= 0.95  # not the schedule's 0.2 s
    # The date, in whole seconds, was a few seconds old when it came: still well over 1 s away.
    assert second > 1.0
    assert [a["status_code"] for a in delivery["attempts"]] == [429, 503, 200]
    assert delivery["attempts"][0]["error"] == "HTTP 429, Retry-After 1 s"


async def test_410_stops_retries_and_later_deliveries_of_the_job(
    client: httpx.AsyncClient, worker: JobcastWorker, receiver: Receiver
) -> None:
    receiver.default = Reply(410)
    webhook = {"url": receiver.url, "events": ["job.processing", "job.completed"]}
    ticket = await submit(client, params={"seconds": 0.5, "steps": 1}, webhook=webhook)
    [gone] = await wait_for_deliveries(client, ticket["id"], "gone")
    await wait_for_status(client, ticket["id"], "completed")
    await receiver.wait_for(1)
    await asyncio.sleep(0.6)  # a retry would have come 0.2 s after the 410
    assert len(receiver.requests) == 1
    assert gone["event"] == "job.processing" and [a["status_code"] for a in gone["attempts"]] == [410]
    assert [d["event"] for d in await deliveries(client, ticket["id"])] == ["job.processing"]
    assert (await client.get("/webhooks/dead-letters")).json()["items"] == []  # gone is not dead


async def test_redirects_are_never_followed(
    client: httpx.AsyncClient, worker: JobcastWorker, receiver: Receiver
) -> None:
    target = await Receiver().start()
    try:
        receiver.default = Reply(307, {"Location": target.url})
        ticket = await submit(client, params=QUICK, webhook={"url": receiver.url})
        [delivery] = await wait_for_deliveries(client, ticket["id"], "dead")
        assert [a["status_code"] for a in delivery["attempts"]] == [307] * 4  # a 3xx is a failure, retried
        assert f"redirect to {target.url} not followed" in delivery["attempts"][0]["error"]
        assert target.connections == 0
    finally:
        await target.stop()


async def test_dead_letters_and_deliveries_are_tenant_isolated(
    client: httpx.AsyncClient, settings: Settings, receiver: Receiver, server: ServerHandle
) -> None:
    receiver.default = Reply(500)
    ticket = await submit(client, params=QUICK, webhook={"url": receiver.url})
    async with running_worker(settings.model_copy(update={"webhook_retry_schedule": ""})):  # one try only
        [delivery] = await wait_for_deliveries(client, ticket["id"], "dead")
    deliveries_path = f"/jobs/{ticket['id']}/deliveries"
    replay_path = f"/webhooks/dead-letters/{delivery['id']}/replay"
    async with httpx.AsyncClient(base_url=server.url, headers=GLOBEX) as globex:
        assert (await globex.get("/webhooks/dead-letters")).json() == {"items": []}
        assert (await globex.post(replay_path)).status_code == 404
        assert (await globex.get(deliveries_path)).status_code == 404
    for bad in ("msg_nope", "msg_" + "0" * 26 + "_1-0", delivery["id"] + "x", "%00"):
        response = await client.post(f"/webhooks/dead-letters/{bad}/replay")
        assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
    # A job read: the job's own token may see its deliveries; dead letters need the API key.
    async with httpx.AsyncClient(base_url=server.url) as anon:
        token = {"token": ticket["token"]}
        assert (await anon.get(deliveries_path, params=token)).json()["items"][0]["id"] == delivery["id"]
        stream = {"token": (await client.post("/tokens")).json()["token"]}
        for credential in (token, stream):
            assert (await anon.get("/webhooks/dead-letters", params=credential)).status_code == 403
            assert (await anon.post(replay_path, params=credential)).status_code == 403
        assert (await anon.get(deliveries_path, params=stream)).status_code == 200
        assert (await anon.get("/webhooks/dead-letters")).status_code == 401
    assert (await client.get("/webhooks/dead-letters", params={"limit": 0})).status_code == 400
    assert len((await client.get("/webhooks/dead-letters")).json()["items"]) == 1


# --- at least once ------------------------------------------------------------------------------------


async def test_a_worker_killed_mid_delivery_does_not_lose_it(
    client: httpx.AsyncClient, settings: Settings, receiver: Receiver, worker_processes: Any
) -> None:
    receiver.replies = [Reply(hang=True)]  # the first attempt never gets an answer
    doomed = worker_processes()
    ticket = await submit(client, params=QUICK, webhook={"url": receiver.url})
    [first] = await receiver.wait_for(1, timeout=20)
    doomed.signal(signal.SIGKILL)
    async with running_worker(settings):  # taken up again once the lost attempt's lease lapsed
        [delivery] = await wait_for_deliveries(client, ticket["id"], "delivered", timeout=60)
    again = receiver.requests[1]
    assert again.headers["webhook-id"] == first.headers["webhook-id"] == delivery["id"]
    assert again.body == first.body
    assert len(delivery["attempts"]) == 1  # the interrupted attempt left no record, and no gap


async def test_a_queued_delivery_survives_a_redis_restart(
    client: httpx.AsyncClient, settings: Settings, receiver: Receiver, redis_server: RedisProcess
) -> None:
    ticket = await submit(client, params=QUICK, webhook={"url": receiver.url, "events": ["job.queued"]})
    redis_server.stop()  # graceful: the append-only file is flushed
    redis_server.start()
    async with running_worker(settings):
        [request] = await receiver.wait_for(1)
    links = {name: path for name, path in ticket["links"].items() if name != "deliveries"}
    assert verify(request)["data"] == {"job_id": ticket["id"], "status": "queued", "links": links}


# --- the retry policy -----------------------------------------------------------------------------


def test_retry_after_values() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0  # in the past: now
    for bad in ("", "soon", "-5", "1.5", "Wed, 99 Foo 2026 99:99:99 GMT", "2026-11-29T16:05:01"):
        assert parse_retry_after(bad, now) is None


def test_next_step() -> None:
    delays = [5.0, 300.0]
    assert next_step(Answer(200), 1, delays) == ("delivered", 0.0)
    assert next_step(Answer(299), 3, delays) == ("delivered", 0.0)
    assert next_step(Answer(410), 1, delays) == ("gone", 0.0)
    assert next_step(Answer(error="refused, nothing sent", refused=True), 1, delays) == ("dead", 0.0)
    assert next_step(Answer(500), 3, delays) == ("dead", 0.0)  # the last try of the schedule
    for tries, delay in ((1, 5.0), (2, 300.0)):
        outcome, wait = next_step(Answer(error="timeout"), tries, delays)
        assert outcome == "retry" and delay * 0.9 <= wait <= delay * 1.1
    assert next_step(Answer(429, retry_after_s=60), 1, delays)[1] == 60.0
    assert next_step(Answer(503, retry_after_s=10**9), 1, delays)[1] == RETRY_AFTER_MAX_S
    assert 4.5 <= next_step(Answer(503, retry_after_s=1), 1, delays)[1] <= 5.5  # never sooner than planned
    assert next_step(Answer(500), 1, []) == ("dead", 0.0)  # an empty schedule: one try


# --- who sees the URL ----------------------------------------------------------------------------


async def test_token_readers_see_the_webhook_url_without_its_path_and_query(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    """A webhook URL often carries a credential in its path or query (Slack, Zapier): only API-key
    holders see it whole; job and stream tokens, often handed to browsers, see its origin."""
    url = "http://127.0.0.1:9/hooks/T0SECRET/B0SECRET?sig=s3cret"
    ticket = await submit(client, webhook={"url": url, "events": ["job.queued"]})
    job_id = ticket["id"]
    assert ticket["webhook"]["url"] == url
    assert (await client.get(f"/jobs/{job_id}")).json()["webhook"]["url"] == url
    [delivery] = await wait_for_deliveries(client, job_id, "pending")
    assert delivery["url"] == url

    stream_token = (await client.post("/tokens")).json()["token"]
    async with httpx.AsyncClient(base_url=client.base_url) as anonymous:
        for token in (ticket["token"], stream_token):
            job = (await anonymous.get(f"/jobs/{job_id}", params={"token": token})).json()
            assert job["webhook"] == {"url": "http://127.0.0.1:9/[redacted]", "events": ["job.queued"]}
            deliveries = (await anonymous.get(f"/jobs/{job_id}/deliveries", params={"token": token})).json()
            assert [d["url"] for d in deliveries["items"]] == ["http://127.0.0.1:9/[redacted]"]
        listed = await anonymous.get("/jobs", params={"token": stream_token})
        assert listed.status_code == 200 and listed.json()["items"][0]["id"] == job_id
        for response in (job, deliveries, listed.json()):
            assert "SECRET" not in orjson.dumps(response).decode() and "s3cret" not in orjson.dumps(response).decode()


async def _two_pending_deliveries(
    settings: Settings, redis: Redis, receiver: Receiver
) -> tuple[WebhookStore, Delivery, Delivery]:
    """A cancelled job with no worker: its two deliveries (queued, cancelled), both still pending."""
    store, webhooks = Store(redis, settings), WebhookStore(redis, settings)
    created = await store.create(
        tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1,
        webhook={"url": receiver.url, "events": ["job.queued", "job.cancelled"]},
    )  # fmt: skip
    assert created.job_id is not None
    await store.cancel(created.job_id, "acme")
    first, second = [await webhooks.get(item["id"]) for item in await webhooks.for_job(created.job_id)]
    assert first is not None and second is not None
    return webhooks, first, second


async def test_nothing_is_sent_to_a_receiver_after_it_answered_410_for_the_job(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Two deliveries of one job in flight at once: while the first waits for its answer (a 410),
    the second is put off rather than sent, and once the 410 is recorded it is never sent."""
    webhooks, first, second = await _two_pending_deliveries(settings, redis, receiver)
    release = asyncio.Event()
    receiver.replies = [Reply(410, hold=release)]
    receiver.default = Reply(410)
    sender = Sender(settings)
    dispatcher = Dispatcher(webhooks, sender, settings)
    try:
        in_flight = asyncio.create_task(dispatcher.attempt(first.id, first.seq))
        await receiver.wait_for(1)
        with pytest.raises(DeliveryBusy) as busy:
            await dispatcher.attempt(second.id, second.seq)
        assert 0 < busy.value.retry_in_s <= settings.webhook_timeout_s + 5
        release.set()
        await in_flight
        await dispatcher.attempt(second.id, second.seq)  # its retry, after the 410
    finally:
        await sender.aclose()
    assert len(receiver.requests) == 1
    states = [(await webhooks.get(d.id)) for d in (first, second)]
    assert [d.status.value for d in states if d is not None] == ["gone", "gone"]
    assert states[1] is not None and states[1].attempts == 0  # never sent


async def test_a_job_s_first_attempts_take_turns_in_the_order_of_its_events(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Deliveries claimed together (a worker that starts behind a job's events): a later event's
    first attempt waits until the earlier event's has been made, so the receiver sees them in order."""
    webhooks, first, second = await _two_pending_deliveries(settings, redis, receiver)
    sender = Sender(settings)
    dispatcher = Dispatcher(webhooks, sender, settings)
    try:
        for _ in range(2):  # nothing in flight: it is the queued event's turn, not the cancelled one's
            with pytest.raises(DeliveryBusy):
                await dispatcher.attempt(second.id, second.seq)
        assert receiver.requests == []
        await dispatcher.attempt(first.id, first.seq)
        await dispatcher.attempt(second.id, second.seq)
    finally:
        await sender.aclose()
    assert [orjson.loads(r.body)["type"] for r in receiver.requests] == ["job.queued", "job.cancelled"]
    done = await webhooks.get(second.id)
    assert done is not None and done.status.value == "delivered" and done.deferrals == 2


def test_a_put_off_attempt_waits_50_ms_doubling_to_2_s_and_not_before_what_it_waits_for_is_due() -> None:
    assert [put_off_s(PutOff(n, 0), 1000.0) for n in (1, 2, 3, 6, 7, 100)] == [0.05, 0.1, 0.2, 1.6, 2.0, 2.0]
    assert put_off_s(PutOff(1, 1_003_500), 1000.0) == 3.5


async def _queued_delivery(
    settings: Settings, redis: Redis, receiver: Receiver
) -> tuple[Store, WebhookStore, str, Delivery]:
    """A new job whose webhook takes its ``job.queued`` event: its stores, its id and that one
    pending delivery."""
    store, webhooks = Store(redis, settings), WebhookStore(redis, settings)
    created = await store.create(
        tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1,
        webhook={"url": receiver.url, "events": ["job.queued"]},
    )  # fmt: skip
    assert created.job_id is not None
    [item] = await webhooks.for_job(created.job_id)
    delivery = await webhooks.get(item["id"])
    assert delivery is not None
    return store, webhooks, created.job_id, delivery


async def test_a_put_off_attempt_does_not_count_as_an_interrupted_run(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Being put off behind another delivery of the same job, however often, never dead-letters."""
    _, webhooks, job_id, delivery = await _queued_delivery(settings, redis, receiver)
    sender = Sender(settings)
    dispatcher = Dispatcher(webhooks, sender, settings)
    holder = await webhooks.lock_job(delivery, 60_000)
    assert isinstance(holder, str)
    try:
        for run in range(1, MAX_RUNS + 5):
            with pytest.raises(DeliveryBusy):
                await dispatcher.attempt(delivery.id, delivery.seq, runs=run)
        await webhooks.unlock_job(job_id, holder)
        await dispatcher.attempt(delivery.id, delivery.seq, runs=MAX_RUNS + 5)
    finally:
        await sender.aclose()
    done = await webhooks.get(delivery.id)
    assert done is not None and done.status.value == "delivered", done


async def test_delivery_arq_gave_up_on_does_not_hold_back_later_ones(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Review finding 1: when arq drops a never-attempted delivery's attempt (max tries exceeded),
    the job's later deliveries no longer wait behind it for good."""
    webhooks, first, second = await _two_pending_deliveries(settings, redis, receiver)
    # What arq's finish_failed_job does with an attempt out of tries: its queue entry and payload go.
    rid = schema.attempt_id(first.id, first.seq)
    await redis.zrem(schema.WEBHOOK_QUEUE, rid)
    await redis.delete(arq_job_key_prefix + rid)
    sender = Sender(settings)
    try:
        await Dispatcher(webhooks, sender, settings).attempt(second.id, second.seq)
    finally:
        await sender.aclose()
    assert [r.headers["webhook-id"] for r in receiver.requests] == [second.id]
    delivered = await webhooks.get(second.id)
    assert delivered is not None and delivered.status.value == "delivered"


async def _dead(webhooks: WebhookStore, webhook_id: str) -> Delivery | None:
    delivery = await webhooks.get(webhook_id)
    return delivery if delivery is not None and delivery.status.value == "dead" else None


async def test_a_delivery_whose_last_try_arq_makes_is_put_off_is_dead_lettered_not_left_pending(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Review finding 1 (fix-worker): arq drops an attempt past its max tries without calling us, so
    on its last try an attempt that is put off once more dead-letters the delivery (listed, counted,
    replayable, expiring with the job) instead of leaving it pending for ever."""
    store, webhooks, job_id, delivery = await _queued_delivery(settings, redis, receiver)
    await store.cancel(job_id, "acme")  # finished: only its delivery is left to settle
    holder = await webhooks.lock_job(delivery, 60_000)  # another attempt of the job is in flight
    assert isinstance(holder, str)
    # As though arq had already put this attempt off all but once: its next run is its last try.
    rid = schema.attempt_id(delivery.id, delivery.seq)
    await redis.set(arq_retry_key_prefix + rid, MAX_TRIES - 1)
    async with running_worker(settings):
        dead = await wait_until(lambda: _dead(webhooks, delivery.id))
    busy = f"another delivery of job {job_id} is in flight or goes first"
    assert dead.last_error == f"gave up after {MAX_TRIES} tries: {busy}"
    assert dead.attempts == 0 and receiver.requests == []  # nothing was sent, and no attempt is made up
    [letter] = await webhooks.dead_letters("acme")
    assert (letter["id"], letter["reason"], letter["last_error"]) == (delivery.id, "failed", dead.last_error)
    assert await webhooks.dead_letter_count("acme") == 1 and (await webhooks.outcome_counts())["dead"] == 1
    assert await redis.ttl(schema.delivery_key(delivery.id)) > 0  # no longer kept for ever
    assert await redis.zscore(schema.WEBHOOK_QUEUE, rid) is None
    assert await webhooks.replay(delivery.id, "acme")  # and the operator can try it again
