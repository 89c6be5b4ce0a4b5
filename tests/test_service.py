"""What the service's own endpoints show to whom: metrics and the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.settings import Settings

from .conftest import ACME, ServerHandle, make_settings


@asynccontextmanager
async def bound_as(settings: Settings, bind_host: str) -> AsyncIterator[httpx.AsyncClient]:
    """A server whose app is told it is bound to ``bind_host`` (it listens on 127.0.0.1 only)."""
    handle = ServerHandle(settings, bind_host=bind_host)
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url) as c:
            yield c
    finally:
        await handle.stop()


@pytest.mark.parametrize("bind_host", ["0.0.0.0", "::", "1.1.1.1", "jobcast.example.com"])
async def test_in_production_metrics_need_a_token_unless_bound_privately(
    redis_server: RedisProcess, redis: Redis, bind_host: str
) -> None:
    async with bound_as(make_settings(redis_server.url), bind_host) as c:
        closed = await c.get("/metrics")
        assert closed.status_code == 403, closed.text
        assert closed.headers["content-type"] == "application/problem+json"
        assert "JOBCAST_METRICS_TOKEN" in closed.json()["detail"]
        assert "acme" not in closed.text
        assert (await c.get("/metrics", headers=ACME)).status_code == 403  # an API key is not the metrics token


@pytest.mark.parametrize("bind_host", ["127.0.0.1", "::1", "10.1.2.3", "localhost"])
async def test_in_production_metrics_are_open_on_a_private_address(
    redis_server: RedisProcess, redis: Redis, bind_host: str
) -> None:
    async with bound_as(make_settings(redis_server.url), bind_host) as c:
        assert (await c.get("/metrics")).status_code == 200


async def test_a_metrics_token_opens_metrics_on_any_address(redis_server: RedisProcess, redis: Redis) -> None:
    async with bound_as(make_settings(redis_server.url, metrics_token="scrape-me"), "0.0.0.0") as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})).status_code == 200


async def test_in_development_metrics_are_open(redis_server: RedisProcess, redis: Redis) -> None:
    async with bound_as(make_settings(redis_server.url, env="development"), "0.0.0.0") as c:
        assert (await c.get("/metrics")).status_code == 200


async def test_the_openapi_document_is_read_like_the_job_types(redis_server: RedisProcess, redis: Redis) -> None:
    """Both describe this deployment's job types and their parameters: both need a key or a stream
    token. The problem types, health and readiness stay open."""
    async with bound_as(make_settings(redis_server.url), "127.0.0.1") as c:
        for path in ("/openapi.json", "/job-types"):
            refused = await c.get(path)
            assert refused.status_code == 401, (path, refused.text)
            assert (await c.get(path, headers=ACME)).status_code == 200
        stream_token = (await c.post("/tokens", headers=ACME)).json()["token"]
        document = await c.get("/openapi.json", params={"token": stream_token})
        assert document.status_code == 200 and document.json()["openapi"].startswith("3.")
        operation = document.json()["paths"]["/openapi.json"]["get"]
        assert operation["security"] == document.json()["paths"]["/job-types"]["get"]["security"]
        for path in ("/problems/validation", "/healthz", "/readyz"):
            assert (await c.get(path)).status_code == 200, path
