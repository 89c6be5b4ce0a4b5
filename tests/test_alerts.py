"""Operator alerts pushed to JOBCAST_ALERT_WEBHOOK_URL: a real server evaluates them, a real local
receiver gets them, the reference ``standardwebhooks`` library checks their signatures."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.settings import ConfigError, Settings

from .conftest import make_settings, running_worker, serving, submit, wait_for_deliveries, wait_until
from .receiver import Received, Receiver, Reply

ALERT_SECRET = "whsec_" + base64.b64encode(b"operator-alert-signing-key-0123").decode()
QUICK = {"seconds": 0, "steps": 1}


@pytest.fixture
async def alerts() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def alert_settings(redis_server: RedisProcess, alerts: Receiver, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_allow_private": True,
        "webhook_retry_schedule": "",  # one try: a failure is a dead letter at once
        "webhook_disable_after_s": 0,
        "alert_webhook_url": alerts.url,
        "alert_webhook_secret": ALERT_SECRET,
        "alert_check_s": 0.05,
        "alert_no_worker_s": 3600,
        "public_url": "https://jobs.example.com",
    }
    values.update(overrides)
    return make_settings(redis_server.url, **values)


def alert_of(request: Received) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(ALERT_SECRET).verify(request.body, request.headers)
    return payload


async def alert_state(redis: Redis, key: str) -> dict[str, Any]:
    raw = await redis.hget(schema.ALERTS, key)
    return orjson.loads(raw) if raw else {}


async def test_dead_letters_alert_once_per_window_across_servers_then_resolve(
    redis_server: RedisProcess, redis: Redis, alerts: Receiver, receiver: Receiver
) -> None:
    settings = alert_settings(redis_server, alerts)
    receiver.default = Reply(500)
    # Two server processes evaluate the same conditions: still one alert.
    async with serving(settings) as client, serving(settings), running_worker(settings):
        first = await submit(client, params=QUICK, webhook={"url": receiver.url})
        [dead] = await wait_for_deliveries(client, first["id"], "dead")
        [request] = await alerts.wait_for(1)
        payload = alert_of(request)  # signed like deliveries
        alert = payload["alert"]
        assert alert["kind"] == "dead_letters" and alert["status"] == "firing" and alert["tenant"] == "acme"
        assert alert["details"] == {"dead_letters": 1, "newest": dead["id"]}
        assert alert["links"] == {"dead_letters": "https://jobs.example.com/webhooks/dead-letters"}
        assert payload["text"].startswith("[FIRING]") and "acme" in payload["text"]

        # A second dead letter inside the window is held back, not sent.
        second = await submit(client, params=QUICK, webhook={"url": receiver.url})
        [dead2] = await wait_for_deliveries(client, second["id"], "dead")

        async def suppressed() -> bool:
            return (await alert_state(redis, "dead_letters|acme")).get("suppressed") == 1

        await wait_until(suppressed)
        assert len(alerts.requests) == 1

        # Once the dead letters are gone, a resolution says so.
        receiver.default = Reply(200)
        for letter in (dead, dead2):
            assert (await client.post(f"/webhooks/dead-letters/{letter['id']}/replay")).status_code == 202
        [_, resolved] = await alerts.wait_for(2)
        payload = alert_of(resolved)
        assert payload["alert"]["kind"] == "dead_letters" and payload["alert"]["status"] == "resolved"
        assert payload["text"].startswith("[RESOLVED]") and "resolved" in payload["text"]
        assert resolved.headers["webhook-id"] != request.headers["webhook-id"]


async def test_no_workers_and_a_backlog_alert_and_resolve(
    redis_server: RedisProcess, redis: Redis, alerts: Receiver
) -> None:
    settings = alert_settings(
        redis_server, alerts, alert_no_worker_s=0.2, alert_queue_threshold=1, alert_queue_for_s=0.2
    )
    async with serving(settings) as client:
        for _ in range(2):
            await submit(client, params=QUICK)
        received = await alerts.wait_for(2)
        firing = {alert_of(r)["alert"]["kind"]: alert_of(r)["alert"] for r in received}
        assert set(firing) == {"no_workers", "queue_backlog"}
        assert firing["no_workers"]["tenant"] is None and firing["no_workers"]["details"]["queued"] == 2
        assert firing["queue_backlog"]["details"] == {"queued": 2, "threshold": 1}
        async with running_worker(settings):
            received = await alerts.wait_for(4, timeout=20)
        resolved = [alert_of(r)["alert"] for r in received[2:]]
        assert {a["kind"] for a in resolved} == {"no_workers", "queue_backlog"}
        assert all(a["status"] == "resolved" for a in resolved)


async def test_a_disabled_destination_alerts(
    redis_server: RedisProcess, redis: Redis, alerts: Receiver, receiver: Receiver
) -> None:
    settings = alert_settings(
        redis_server, alerts, webhook_disable_after_s=0.3, webhook_retry_schedule=",".join(["0.2"] * 10)
    )
    receiver.default = Reply(500)
    async with serving(settings) as client, running_worker(settings):
        await submit(client, params=QUICK, webhook={"url": receiver.url})

        async def disabled_alert() -> dict[str, Any] | None:
            for request in alerts.requests:
                alert: dict[str, Any] = alert_of(request)["alert"]
                if alert["kind"] == "destination_disabled":
                    return alert
            return None

        alert = await wait_until(disabled_alert)
    assert alert["tenant"] == "acme" and alert["details"] == {"destinations": [receiver.origin]}
    assert alert["links"] == {"destinations": "https://jobs.example.com/webhooks/destinations"}


def test_an_alert_url_without_a_signing_secret_is_a_startup_error(redis_server: RedisProcess) -> None:
    with pytest.raises(ConfigError, match="JOBCAST_ALERT_WEBHOOK_SECRET"):
        make_settings(redis_server.url, alert_webhook_url="https://alerts.example.com/hook")
    with pytest.raises(ConfigError, match="JOBCAST_ALERT_WEBHOOK_SECRET"):
        make_settings(redis_server.url, alert_webhook_secret="not-a-secret")


def test_the_alert_and_public_urls_must_be_absolute(redis_server: RedisProcess) -> None:
    with pytest.raises(ValueError, match="absolute"):
        make_settings(redis_server.url, alert_webhook_url="alerts.example.com", alert_webhook_secret=ALERT_SECRET)
    with pytest.raises(ValueError, match="absolute"):
        make_settings(redis_server.url, public_url="https://x.example/api?x=1")
    assert make_settings(redis_server.url, public_url="https://x.example/api/").public_url == "https://x.example/api"
