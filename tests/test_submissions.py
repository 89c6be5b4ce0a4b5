"""``POST /jobs`` against hostile and mistaken bodies: every attempt is rate-limited, and the 422
says enough to fix the body while staying small, whatever the body holds."""

from __future__ import annotations

import httpx
import orjson
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.models import EventName

from .conftest import make_settings, serving

MAX_ERRORS = 20


async def test_invalid_submissions_count_against_the_tenant_s_rate(redis_server: RedisProcess, redis: Redis) -> None:
    async with serving(make_settings(redis_server.url, submit_rate="2/3600")) as c:
        for _ in range(2):
            invalid = await c.post("/jobs", json={"type": "sleep", "params": {"seconds": -1}})
            assert invalid.status_code == 422, invalid.text
            assert "ratelimit" in invalid.headers
        refused = await c.post("/jobs", json={"type": "sleep", "params": {"seconds": -1}})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        valid = await c.post("/jobs", json={"type": "sleep"})
        assert valid.status_code == 429, valid.text
        assert await redis.keys("jobcast:job:*") == []


async def test_a_body_with_thousands_of_mistakes_gets_a_small_422_naming_the_first(client: httpx.AsyncClient) -> None:
    unknown = {f"field_{i:06d}": i for i in range(50_000)}
    response = await client.post("/jobs", content=orjson.dumps({"type": "sleep", **unknown}))
    assert response.status_code == 422, response.text[:500]
    body = response.json()
    assert len(body["errors"]) == MAX_ERRORS
    assert body["errors_omitted"] == 50_000 - MAX_ERRORS
    assert body["errors"][0]["loc"] == ["body", "field_000000"]
    assert len(response.content) < 8 * 1024
    assert "50000 errors" in body["detail"] or "49997 more" in body["detail"]


async def test_a_webhook_with_many_event_names_is_refused_without_checking_each(client: httpx.AsyncClient) -> None:
    events = ["bad"] * 120_000  # ~720 KB, under the body limit
    body = {"type": "sleep", "webhook": {"url": "https://hooks.example.com/x", "events": events}}
    response = await client.post("/jobs", content=orjson.dumps(body))
    assert response.status_code == 422, response.text[:500]
    errors = response.json()["errors"]
    assert errors == [{"loc": ["body", "webhook", "events"], "msg": errors[0]["msg"], "type": "too_long"}], errors[:3]
    assert str(len(EventName)) in errors[0]["msg"]
    assert len(response.content) < 2 * 1024


async def test_a_long_field_name_is_cut_in_the_errors(client: httpx.AsyncClient) -> None:
    name = "x" * 100_000
    response = await client.post("/jobs", content=orjson.dumps({"type": "sleep", name: 1}))
    assert response.status_code == 422
    assert len(response.content) < 2 * 1024
    assert response.json()["errors"][0]["loc"][1].startswith("x" * 50)
