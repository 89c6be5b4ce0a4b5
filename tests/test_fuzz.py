"""The contract, fuzzed: schemathesis generates requests from /openapi.json against a live server.

Every answer must be documented (status, content type, body schema), nothing may be a 5xx, every
4xx is problem+json, and a rejected request must leave Redis exactly as it was. The default run
is bounded (``FUZZ_EXAMPLES`` per operation); ``pytest -m fuzz_long`` runs many more.

The two event streams are left out: a stream that is valid never ends by itself, which is not
something a request/response fuzzer can wait for. tests/test_sse.py covers them. So is ``GET /ws``,
a WebSocket handshake (its frames are fuzzed by tests/test_ws_faults.py).
"""

from __future__ import annotations

import base64
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.openapi import build_openapi
from jobcast.worker import schema as keys
from jobcast.worker.settings import Settings
from jobcast.worker.types import load_registry

from .conftest import WebProcess, make_settings

FUZZ_EXAMPLES = 30
LONG_EXAMPLES = 1000

REGISTRY = load_registry(Settings(env="development", job_modules="tests.jobtypes"))
schema = schemathesis.openapi.from_dict(build_openapi(REGISTRY)).exclude(path_regex=r"(events|/ws)$")
# Credentials are ours to send (below); their absence and misuse are tested in tests/test_api.py.
schema.config.generation.with_security_parameters = False


@pytest.fixture(scope="module")
def live_server(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    web = WebProcess(
        make_settings(redis_server.url),
        Path(tmp_path_factory.mktemp("fuzz")) / "web.log",
        JOBCAST_MAX_QUEUED="200",
        # Webhooks are accepted (a secret is set) without resolving their hosts: the fuzzer's
        # made-up names must not turn into DNS queries. No worker runs, so nothing is delivered.
        JOBCAST_WEBHOOK_SECRET="whsec_" + base64.b64encode(b"fuzz-secret-0123456789abcdef").decode(),
        JOBCAST_WEBHOOK_ALLOW_PRIVATE="1",
        JOBCAST_LOG_LEVEL="WARNING",
    )
    try:
        web.wait_ready()
        yield web.url
    finally:
        web.signal(signal.SIGTERM)
        web.wait(15)
        web.close()
    # The server logged no traceback: every error was an answer, not a crash.
    assert "Traceback" not in web.output()


def fingerprint(client: redis.Redis) -> tuple[int, int, int]:
    """Enough of Redis to see any write: key count, tenant log length, queued jobs."""
    return (
        int(client.dbsize()),
        int(client.xlen(keys.tenant_log_key("acme"))),
        int(client.get(keys.QUEUED_COUNT) or 0),
    )


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    # One session, closed at the end: schemathesis would otherwise open one per call, whose
    # sockets close only when collected (ResourceWarnings in whichever test runs then).
    with requests.Session() as session:
        yield session


def check(case: Any, url: str, redis_url: str, http: requests.Session) -> None:
    with redis.Redis.from_url(redis_url) as client:
        before = fingerprint(client)
        # A reused Idempotency-Key with another body is a 422 by contract (docs/API.md), whatever the
        # schema says of each request alone: that one check cannot judge such requests.
        excluded = [positive_data_acceptance] if "Idempotency-Key" in (case.headers or {}) else []
        if case.path == "/readyz":
            excluded.append(not_a_server_error)  # no worker runs here: 503 with ?require_workers=true
        response = case.call_and_validate(
            base_url=url, session=http, headers={"Authorization": "Bearer key-acme"}, excluded_checks=excluded
        )
        content_type = response.headers.get("content-type", [""])[0]
        if response.status_code == 503 and case.path == "/readyz":
            # Documented: no worker runs beside this server, and ?require_workers=true asks for one.
            assert "jobcast worker" in response.json()["detail"]
        elif response.status_code == 503:
            # The other 5xx allowed: at capacity (JOBCAST_MAX_QUEUED=200), as documented.
            assert content_type == "application/problem+json"
            assert "capacity" in response.json()["detail"] and int(client.get(keys.QUEUED_COUNT) or 0) >= 200
        else:
            assert response.status_code < 500, response.text
        if 400 <= response.status_code < 500:
            assert content_type == "application/problem+json"
            body = response.json()
            assert body["status"] == response.status_code and body["detail"]
            assert fingerprint(client) == before, f"{case.method} {case.path} answered {response.status_code} but wrote"


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_contract(
    case: Any, live_server: str, redis_server: RedisProcess, http: requests.Session
) -> None:
    check(case, live_server, redis_server.url, http)


@pytest.mark.fuzz_long
@schema.parametrize()
@settings(max_examples=LONG_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_contract_long(
    case: Any, live_server: str, redis_server: RedisProcess, http: requests.Session
) -> None:
    check(case, live_server, redis_server.url, http)
