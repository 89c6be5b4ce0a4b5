"""The HTTP contract of docs/API.md: real uvicorn, real Redis, real arq worker where a job must run."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.requests import MAX_BODY
from jobcast.tokens import TokenSigner
from jobcast.worker.ids import new_job_id
from jobcast.worker.main import JobcastWorker

from .conftest import (
    GLOBEX,
    LONG_WAIT_S,
    SECRET,
    ServerHandle,
    before_the_wait_ends,
    hub_of,
    make_settings,
    submit,
    wait_for_status,
    wait_until,
)

PROBLEM_JSON = "application/problem+json"
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
#: No worker runs in most tests, so a job stays queued; 5 s keeps it running a while where one does.
QUEUED_PARAMS: dict[str, Any] = {"seconds": 5}
QUEUED_SLEEP: dict[str, Any] = {"type": "sleep", "params": QUEUED_PARAMS}


@pytest.fixture
async def anon(server: ServerHandle) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no credentials of its own (tokens are passed per request)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        yield c


def assert_problem(response: httpx.Response, status: int, *mentions: str) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem with ``status`` and a detail mentioning each of ``mentions``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and len(body["detail"]) >= 15
    assert "Traceback" not in response.text
    for mention in mentions:
        assert mention.lower() in body["detail"].lower(), body["detail"]
    return body


async def keys(redis: Redis) -> set[str]:
    return set(await redis.keys("*"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def both_ways(token: str) -> list[dict[str, Any]]:
    """Request arguments for the two ways a token travels: Bearer header, and ?token= (for EventSource)."""
    return [{"headers": bearer(token)}, {"params": {"token": token}}]


def tampered(token: str, part: int) -> str:
    """``token`` with one character in the middle of its payload (1) or signature (2) changed."""
    pieces = token.split(".")
    middle = len(pieces[part]) // 2
    pieces[part] = pieces[part][:middle] + ("A" if pieces[part][middle] != "A" else "B") + pieces[part][middle + 1 :]
    return ".".join(pieces)


async def list_ids(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/jobs", params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


# --- authentication -----------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/jobs"),
    ("POST", "/jobs"),
    ("GET", "/jobs/{id}"),
    ("POST", "/jobs/{id}/cancel"),
    ("GET", "/jobs/{id}/result"),
    ("GET", "/jobs/{id}/events"),
    ("GET", "/events"),
    ("GET", "/job-types"),
    ("POST", "/tokens"),
]


async def test_missing_credentials_answer_401_with_bearer_challenge_everywhere(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    for method, path in PROTECTED:
        response = await anon.request(method, path.format(id=ticket["id"]), json=QUEUED_SLEEP)
        assert_problem(response, 401, "Bearer")
        assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
    assert await list_ids(client) == [ticket["id"]]  # the unauthenticated POST created nothing


async def test_wrong_api_key_is_401(anon: httpx.AsyncClient, redis: Redis) -> None:
    before = await keys(redis)
    for method, path in PROTECTED:
        response = await anon.request(
            method, path.format(id=new_job_id()), json=QUEUED_SLEEP, headers=bearer("key-wrong")
        )
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert await keys(redis) == before


@pytest.mark.parametrize(
    "header",
    ["Basic a2V5LWFjbWU6", "Bearer", "key-acme", "Token key-acme", "Bearerkey-acme"],
)
async def test_malformed_authorization_header_is_401(anon: httpx.AsyncClient, header: str) -> None:
    response = await anon.get("/jobs", headers={"Authorization": header})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_bearer_scheme_is_case_insensitive(anon: httpx.AsyncClient) -> None:
    response = await anon.get("/jobs", headers={"Authorization": "bearer key-acme"})
    assert response.status_code == 200


async def test_api_key_in_query_string_is_not_accepted(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    for path in ("/jobs", f"/jobs/{ticket['id']}", f"/jobs/{ticket['id']}/result", "/job-types"):
        response = await anon.get(path, params={"token": "key-acme"})
        assert_problem(response, 401)
    response = await anon.post("/jobs", params={"token": "key-acme"}, json=QUEUED_SLEEP)
    assert_problem(response, 401)
    assert await list_ids(client) == [ticket["id"]]


async def test_submission_returns_a_job_token_that_reads_its_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    response = await client.post("/jobs", json=QUEUED_SLEEP)
    assert response.status_code == 202
    ticket = response.json()
    assert response.headers["location"] == f"/jobs/{ticket['id']}"
    assert ticket["token"].startswith("jc1.")
    assert RFC3339_Z.match(ticket["token_expires_at"])
    expires = datetime.fromisoformat(ticket["token_expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=7))) < timedelta(seconds=30)

    for creds in both_ways(ticket["token"]):
        job = await anon.get(f"/jobs/{ticket['id']}", **creds)
        assert job.status_code == 200, job.text
        assert job.json()["id"] == ticket["id"] and "token" not in job.json()
        result = await anon.get(f"/jobs/{ticket['id']}/result", **creds)
        assert_problem(result, 409)  # authenticated; the job has no result yet


async def test_job_token_reads_the_result_of_its_completed_job(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    ticket = await submit(client, params={"seconds": 0, "steps": 1})
    await wait_for_status(client, ticket["id"], "completed")
    for creds in both_ways(ticket["token"]):
        response = await anon.get(f"/jobs/{ticket['id']}/result", **creds)
        assert response.status_code == 200
        assert response.json() == {"slept": 0.0}


async def test_job_token_is_forbidden_for_another_job_of_the_same_tenant(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    mine, other = await submit(client, params=QUEUED_PARAMS), await submit(client, params=QUEUED_PARAMS)
    for path in (f"/jobs/{other['id']}", f"/jobs/{other['id']}/result", f"/jobs/{new_job_id()}", "/jobs", "/job-types"):
        for creds in both_ways(mine["token"]):
            response = await anon.get(path, **creds)
            assert_problem(response, 403)


async def test_job_token_cannot_write(client: httpx.AsyncClient, anon: httpx.AsyncClient, redis: Redis) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    before = await keys(redis)
    for creds in both_ways(ticket["token"]):
        assert_problem(await anon.post("/jobs", json=QUEUED_SLEEP, **creds), 403, "api key")
        assert_problem(await anon.post(f"/jobs/{ticket['id']}/cancel", **creds), 403, "api key")
        assert_problem(await anon.post("/tokens", **creds), 403, "api key")
    assert await keys(redis) == before
    assert (await client.get(f"/jobs/{ticket['id']}")).json()["status"] == "queued"


async def test_stream_token_is_created_with_an_rfc3339_expiry(client: httpx.AsyncClient) -> None:
    response = await client.post("/tokens")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"token", "expires_at"}
    assert RFC3339_Z.match(body["expires_at"]), body["expires_at"]
    expires = datetime.fromisoformat(body["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(hours=1))) < timedelta(seconds=30)
    token = TokenSigner(SECRET).verify(body["token"])
    assert (token.scope, token.tenant, token.job_id) == ("stream", "acme", None)


async def test_stream_token_reads_all_of_the_tenants_jobs_but_cannot_write(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, redis: Redis
) -> None:
    first, second = await submit(client, params=QUEUED_PARAMS), await submit(client, params=QUEUED_PARAMS)
    stream = (await client.post("/tokens")).json()["token"]
    for creds in both_ways(stream):
        listing = await anon.get("/jobs", **creds)
        assert listing.status_code == 200
        assert [item["id"] for item in listing.json()["items"]] == [second["id"], first["id"]]
        for ticket in (first, second):
            job = await anon.get(f"/jobs/{ticket['id']}", **creds)
            assert job.status_code == 200 and job.json()["id"] == ticket["id"]
            assert_problem(await anon.get(f"/jobs/{ticket['id']}/result", **creds), 409)
        assert (await anon.get("/job-types", **creds)).status_code == 200

    before = await keys(redis)
    for creds in both_ways(stream):
        assert_problem(await anon.post("/jobs", json=QUEUED_SLEEP, **creds), 403)
        assert_problem(await anon.post(f"/jobs/{first['id']}/cancel", **creds), 403)
        assert_problem(await anon.post("/tokens", **creds), 403)
    assert await keys(redis) == before
    assert (await client.get(f"/jobs/{first['id']}")).json()["status"] == "queued"


@pytest.mark.parametrize("part", [1, 2], ids=["payload", "signature"])
async def test_tampered_tokens_are_401(client: httpx.AsyncClient, anon: httpx.AsyncClient, part: int) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    stream = (await client.post("/tokens")).json()["token"]
    for token, path in ((ticket["token"], f"/jobs/{ticket['id']}"), (stream, "/jobs")):
        assert (await anon.get(path, params={"token": token})).status_code == 200  # the genuine one works
        forged = tampered(token, part)
        for creds in both_ways(forged):
            response = await anon.get(path, **creds)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_expired_and_foreign_tokens_are_401(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    expired_job, _ = TokenSigner(SECRET).mint("job", "acme", -10, ticket["id"])
    expired_stream, _ = TokenSigner(SECRET).mint("stream", "acme", -10)
    foreign, _ = TokenSigner(SECRET + "-other").mint("stream", "acme", 600)
    for token, path in (
        (expired_job, f"/jobs/{ticket['id']}"),
        (expired_stream, "/jobs"),
        (foreign, "/jobs"),
    ):
        for creds in both_ways(token):
            response = await anon.get(path, **creds)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")
    # The same claims, unexpired and signed with the server's key, are accepted.
    fresh, _ = TokenSigner(SECRET).mint("job", "acme", 60, ticket["id"])
    assert (await anon.get(f"/jobs/{ticket['id']}", params={"token": fresh})).status_code == 200


async def test_non_ascii_token_is_401_not_500(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    # A token is attacker-controlled text; the signature check must refuse it, not crash on it.
    ticket = await submit(client, params=QUEUED_PARAMS)
    query = await anon.get(f"/jobs/{ticket['id']}?token=jc1.a.%C3%A9")
    assert_problem(query, 401)
    header = await anon.get("/jobs", headers=[(b"Authorization", b"Bearer jc1.a.\xe9")])
    assert_problem(header, 401)


# --- tenant isolation -----------------------------------------------------------------------------------


async def test_another_tenants_job_is_404_on_every_endpoint(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    job_id = ticket["id"]
    unknown = new_job_id()
    for method, path, params in (
        ("GET", f"/jobs/{job_id}", {}),
        ("GET", f"/jobs/{job_id}", {"wait": str(LONG_WAIT_S)}),
        ("POST", f"/jobs/{job_id}/cancel", {}),
        ("GET", f"/jobs/{job_id}/result", {}),
        ("GET", f"/jobs/{job_id}/events", {}),
    ):
        async with before_the_wait_ends():  # no long-poll on someone else's job
            response = await client.request(method, path, params=params, headers=GLOBEX)
        body = assert_problem(response, 404)
        # Indistinguishable from an id that does not exist at all.
        missing = await client.request(method, path.replace(job_id, unknown), params=params, headers=GLOBEX)
        assert body == {**missing.json(), "detail": missing.json()["detail"].replace(unknown, job_id)}
    assert (await client.get("/jobs", headers=GLOBEX)).json() == {"items": [], "next_cursor": None}
    assert (await client.get(f"/jobs/{job_id}")).json()["status"] == "queued"  # the cancel did nothing
    assert await list_ids(client) == [job_id]


async def test_listing_shows_each_tenant_only_its_own_jobs(client: httpx.AsyncClient) -> None:
    acme = [(await submit(client, params=QUEUED_PARAMS))["id"] for _ in range(2)]
    globex_job = await client.post("/jobs", json=QUEUED_SLEEP, headers=GLOBEX)
    assert globex_job.status_code == 202
    assert await list_ids(client) == acme[::-1]
    response = await client.get("/jobs", headers=GLOBEX)
    assert [item["id"] for item in response.json()["items"]] == [globex_job.json()["id"]]
    for status in ("queued", "cancelled"):
        response = await client.get("/jobs", params={"status": status, "type": "sleep"}, headers=GLOBEX)
        assert all(item["id"] not in acme for item in response.json()["items"])


async def test_tokens_do_not_cross_tenants(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    acme = await submit(client, params=QUEUED_PARAMS)
    globex_response = await client.post("/jobs", json=QUEUED_SLEEP, headers=GLOBEX)
    globex = globex_response.json()
    # A job token is scoped to its own job: useless for any other, whoever owns it.
    assert_problem(await anon.get(f"/jobs/{globex['id']}", params={"token": acme["token"]}), 403)
    assert_problem(await anon.get(f"/jobs/{acme['id']}", params={"token": globex["token"]}), 403)
    assert_problem(await anon.get(f"/jobs/{globex['id']}/result", params={"token": acme["token"]}), 403)
    # A stream token reads only its tenant's jobs; another tenant's job does not exist for it.
    stream = (await client.post("/tokens")).json()["token"]
    assert_problem(await anon.get(f"/jobs/{globex['id']}", params={"token": stream}), 404)
    assert_problem(await anon.get(f"/jobs/{globex['id']}/result", params={"token": stream}), 404)
    listing = await anon.get("/jobs", params={"token": stream})
    assert [item["id"] for item in listing.json()["items"]] == [acme["id"]]
    # Even a validly signed job token naming another tenant's job id reads nothing of it.
    crossed, _ = TokenSigner(SECRET).mint("job", "globex", 60, acme["id"])
    assert_problem(await anon.get(f"/jobs/{acme['id']}", params={"token": crossed}), 404)


# --- validation --------------------------------------------------------------------------------------------


async def assert_rejected_without_writes(
    client: httpx.AsyncClient, redis: Redis, status: int, *mentions: str, **request: Any
) -> dict[str, Any]:
    before = await keys(redis)
    response = await client.post("/jobs", **request)
    body = assert_problem(response, status, *mentions)
    assert await keys(redis) == before
    assert await list_ids(client) == []
    return body


async def test_body_that_is_not_json_is_400(client: httpx.AsyncClient, redis: Redis) -> None:
    for raw in (b"{not json", b"", b'{"type": "sleep",}', b"\xef\xbb\xbf{}", b'{"type": "\xff"}'):
        await assert_rejected_without_writes(
            client, redis, 400, "JSON", content=raw, headers={"Content-Type": "application/json"}
        )


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b'"sleep"', b"42", b"null", b"true"])
async def test_json_that_is_not_an_object_is_422(client: httpx.AsyncClient, redis: Redis, raw: bytes) -> None:
    body = await assert_rejected_without_writes(
        client, redis, 422, "object", content=raw, headers={"Content-Type": "application/json"}
    )
    assert body["errors"][0]["loc"] == ["body"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
async def test_wrong_content_type_is_415(client: httpx.AsyncClient, redis: Redis, content_type: str) -> None:
    await assert_rejected_without_writes(
        client,
        redis,
        415,
        "application/json",
        content=orjson.dumps(QUEUED_SLEEP),
        headers={"Content-Type": content_type},
    )


async def test_json_with_charset_parameter_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs", content=orjson.dumps(QUEUED_SLEEP), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 202


async def test_unknown_job_type_is_422_listing_the_known_ones(client: httpx.AsyncClient, redis: Redis) -> None:
    body = await assert_rejected_without_writes(
        client, redis, 422, "sleep", "report", json={"type": "nope", "params": {}}
    )
    assert body["errors"][0]["loc"] == ["body", "type"]
    assert isinstance(body["errors"][0]["msg"], str) and body["errors"][0]["msg"]


@pytest.mark.parametrize(
    ("submission", "loc"),
    [
        ({"type": "sleep", "params": {"seconds": -1}}, ["body", "params", "seconds"]),
        ({"type": "sleep", "params": {"seconds": 3601}}, ["body", "params", "seconds"]),
        ({"type": "sleep", "params": {"steps": 0}}, ["body", "params", "steps"]),
        ({"type": "sleep", "params": {"seconds": "soon"}}, ["body", "params", "seconds"]),
        ({"type": "sleep", "params": {"bogus": 1}}, ["body", "params", "bogus"]),
        ({"type": "report", "params": {}}, ["body", "params", "rows"]),
        ({"type": "report", "params": {"rows": 0}}, ["body", "params", "rows"]),
        ({"type": "report", "params": {"rows": 10_000_001}}, ["body", "params", "rows"]),
    ],
)
async def test_bad_params_are_422_with_their_location(
    client: httpx.AsyncClient, redis: Redis, submission: dict[str, Any], loc: list[str]
) -> None:
    body = await assert_rejected_without_writes(client, redis, 422, loc[-1], json=submission)
    assert body["errors"][0]["loc"][: len(loc)] == loc


@pytest.mark.parametrize(
    ("submission", "loc"),
    [
        ({"type": "sleep", "colour": "blue"}, ["body", "colour"]),
        ({"type": "sleep", "priority": "urgent"}, ["body", "priority"]),
        ({"type": "sleep", "priority": "HIGH"}, ["body", "priority"]),
        ({"params": {}}, ["body", "type"]),
        ({"type": ""}, ["body", "type"]),
        ({"type": 7}, ["body", "type"]),
        ({"type": "sleep", "params": [1]}, ["body", "params"]),
        ({"type": "sleep", "params": None}, ["body", "params"]),
    ],
)
async def test_bad_submission_fields_are_422(
    client: httpx.AsyncClient, redis: Redis, submission: dict[str, Any], loc: list[str]
) -> None:
    body = await assert_rejected_without_writes(client, redis, 422, json=submission)
    assert body["errors"][0]["loc"][: len(loc)] == loc
    assert loc[-1] in body["detail"]


async def test_malformed_webhook_is_422(client: httpx.AsyncClient, redis: Redis) -> None:
    body = await assert_rejected_without_writes(
        client, redis, 422, json={"type": "sleep", "webhook": {"url": "not a url", "events": []}}
    )
    assert all(error["loc"][:2] == ["body", "webhook"] for error in body["errors"])


def padded_submission(size: int) -> bytes:
    """A JSON submission of exactly ``size`` bytes (an unknown field carries the padding)."""
    head, tail = b'{"type": "sleep", "params": {}, "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_body_over_1_mib_is_413(client: httpx.AsyncClient, redis: Redis) -> None:
    await assert_rejected_without_writes(
        client,
        redis,
        413,
        "1 MiB",
        content=padded_submission(MAX_BODY + 1),
        headers={"Content-Type": "application/json"},
    )


async def test_chunked_body_over_1_mib_is_413(client: httpx.AsyncClient, redis: Redis) -> None:
    data = padded_submission(MAX_BODY + 64 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    before = await keys(redis)
    response = await client.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_problem(response, 413, "1 MiB")
    assert await keys(redis) == before


async def test_body_of_exactly_1_mib_is_read(client: httpx.AsyncClient, redis: Redis) -> None:
    # The limit is inclusive: this one is read, and refused for its unknown field, not its size.
    body = await assert_rejected_without_writes(
        client, redis, 422, content=padded_submission(MAX_BODY), headers={"Content-Type": "application/json"}
    )
    assert body["errors"][0]["loc"] == ["body", "pad"]


@pytest.mark.parametrize(
    ("params", "mention"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": "-3"}, "limit"),
        ({"status": "bogus"}, "status"),
        ({"status": "QUEUED"}, "status"),
        ({"type": "nope"}, "type"),
        ({"cursor": "!!!"}, "cursor"),
        ({"cursor": "am9iXzEyMw"}, "cursor"),  # base64url of "job_123": not a job id
        ({"cursor": "__8"}, "cursor"),  # base64url of b"\xff\xff": not UTF-8
    ],
)
async def test_bad_listing_query_is_400(client: httpx.AsyncClient, params: dict[str, str], mention: str) -> None:
    assert_problem(await client.get("/jobs", params=params), 400, mention)


async def test_listing_limit_bounds_are_inclusive(client: httpx.AsyncClient) -> None:
    for limit in ("1", "200"):
        response = await client.get("/jobs", params={"limit": limit})
        assert response.status_code == 200 and response.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("wait", ["-1", "61", "nan", "NaN", "inf", "-inf", "abc", "", "1e309"])
async def test_bad_wait_is_400(client: httpx.AsyncClient, wait: str) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    assert_problem(await client.get(f"/jobs/{ticket['id']}", params={"wait": wait}), 400, "wait")


@pytest.mark.parametrize("path", ["/nope", "/jobs/x/y/z", "/v1/jobs", "/jobs/x/cancel/now", "/static/nope.js"])
async def test_unknown_path_is_404_problem(client: httpx.AsyncClient, path: str) -> None:
    assert_problem(await client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/jobs/{id}", {"GET"}),
        ("PUT", "/jobs/{id}", {"GET"}),
        ("GET", "/jobs/{id}/cancel", {"POST"}),
        ("POST", "/jobs/{id}/result", {"GET"}),
        ("GET", "/tokens", {"POST"}),
        ("POST", "/job-types", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/jobs", {"GET", "POST"}),
        ("PATCH", "/jobs", {"GET", "POST"}),
    ],
)
async def test_wrong_method_is_405_problem_with_allow(
    client: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    response = await client.request(method, path.format(id=new_job_id()))
    assert_problem(response, 405)
    listed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed <= listed, f"Allow: {response.headers['allow']} for {method} {path}; expected {allowed}"


WEIRD_GETS = [
    "/jobs/job_" + "Z" * 6000,
    "/jobs/" + quote("jöb_日本語"),
    "/jobs/%00",
    "/jobs/job_%00",
    "/jobs/%00/result",
    "/jobs/%ZZ",
    "/jobs/%2e%2e",
    "/jobs/..%2f..%2fetc%2fpasswd",
    "/jobs/%C0%AF",
    "/jobs/%FF%FE",
    "/jobs/" + new_job_id().lower(),
    "/jobs/job_" + "0" * 26,
    "/jobs/job_" + "0" * 26 + "?wait=0.01",
    "/jobs?limit=" + "9" * 5000,
    "/jobs?limit=1&limit=2",
    "/jobs?limit=%00",
    "/jobs?limit=%EF%BC%93",  # fullwidth digit three
    "/jobs?status=",
    "/jobs?type=",
    "/jobs?type=%00",
    "/jobs?cursor=" + "A" * 7000,
    "/jobs?cursor=%00",
    "/jobs?cursor=====",
    "/jobs?cursor=" + base64.urlsafe_b64encode(b"job_" + b"\xff" * 26).decode(),
    "/jobs?" + "x=" + "a" * 7000,
    "/jobs/%00/deliveries",
    "/jobs/job_" + "Z" * 6000 + "/deliveries",
    "/jobs/job_" + "0" * 26 + "/deliveries",
    "/webhooks/dead-letters?limit=" + "9" * 5000,
    "/webhooks/dead-letters?limit=%00",
    "/jobs?" + "&".join(f"k{i}=v" for i in range(800)),
    "/jobs?token=jc1..",
    "/jobs?token=" + "a" * 7000,
    "/jobs?token=jc1.%00.%00",
    "/job-types?x=%FF",
]


async def test_weird_reads_never_answer_5xx(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    paths = [
        *WEIRD_GETS,
        f"/jobs/{ticket['id']}?wait=" + "9" * 5000,
        f"/jobs/{ticket['id']}?wait=0x10",
        f"/jobs/{ticket['id']}?wait=%00",
        f"/jobs/{ticket['id']}?wait=-0",
        f"/jobs/{ticket['id']}/result",
    ]
    odd_headers = [
        {},
        {"If-None-Match": "*"},
        {"If-None-Match": '"' + "x" * 4000 + '"'},
        {"If-None-Match": ",,,W/,"},
        {"Accept": "text/csv;q=0, */*;q=0.1, ;;;"},
    ]
    bad: list[str] = []
    for path in paths:
        for headers in odd_headers:
            response = await client.get(path, headers=headers)
            if response.status_code >= 500 or (
                response.status_code >= 400 and response.headers.get("content-type") != PROBLEM_JSON
            ):
                bad.append(f"GET {path[:80]} {headers} -> {response.status_code} {response.text[:200]}")
    assert not bad, "\n".join(bad)


WEIRD_BODIES: list[tuple[bytes, str]] = [
    (b"[" * 5000 + b"]" * 5000, "application/json"),
    (b'{"type": "sleep", "params": {"seconds": 1e400}}', "application/json"),
    (b'{"type": "sleep", "params": {"steps": 99999999999999999999999}}', "application/json"),
    (b'{"type": "report", "params": {"rows": 1, "seed": 18446744073709551615}}', "application/json"),
    (b'{"type": "report", "params": {"rows": 1, "seed": -9223372036854775809}}', "application/json"),
    (b'{"type": "' + b"a" * 500_000 + b'"}', "application/json"),
    (b'{"type": "sleep", "params": {"seconds": "NaN"}}', "application/json"),
    (b'{"type": "sleep", "params": {"seconds": "Infinity"}}', "application/json"),
    (b'{"type": "\\u0000"}', "application/json"),
    (b'{"type": "sl\\ud800eep"}', "application/json"),
    (b'{"type": "sleep", "type": "report"}', "application/json"),
    (b'{"type": "sleep", "params": {"\\u0000": 1}}', "application/json"),
    (b'{"type": "sleep", "webhook": "x"}', "application/json"),
    (b'{"type": "sleep", "webhook": {"url": "javascript:alert(1)"}}', "application/json"),
    (b'{"type": "sleep", "webhook": {"url": "https://a.example", "events": ["job.nope"]}}', "application/json"),
    (b'{"type": "sleep", "params": {"seconds": 1}}', "application/json; charset=utf-16"),
    (b'{"type": "sleep", "params": {"seconds": 1}}', "application/vnd.api+json"),
    (b"\x00\x01\x02", "application/json"),
    (b'{"type": "sleep"}', "multipart/form-data; boundary=x"),
    (b'{"type": "sleep"}', ""),
]


async def test_weird_submissions_never_answer_5xx(client: httpx.AsyncClient) -> None:
    bad: list[str] = []
    for raw, content_type in WEIRD_BODIES:
        for key in (None, "k" * 255, "é-key".encode("latin-1"), "key with spaces"):
            headers = [(b"Content-Type", content_type.encode())]
            if key is not None:
                headers.append((b"Idempotency-Key", key.encode("latin-1") if isinstance(key, str) else key))
            response = await client.post("/jobs", content=raw, headers=headers)
            if response.status_code >= 500 or (
                response.status_code >= 400 and response.headers.get("content-type") != PROBLEM_JSON
            ):
                bad.append(f"POST {raw[:60]!r} {headers} -> {response.status_code} {response.text[:200]}")
    for path in (
        "/jobs/%00/cancel",
        "/jobs/job_" + "Z" * 6000 + "/cancel",
        "/jobs/" + quote("ß") + "/cancel",
        "/webhooks/dead-letters/%00/replay",
        "/webhooks/dead-letters/msg_" + "Z" * 6000 + "/replay",
        "/webhooks/dead-letters/" + quote("msg_日本") + "/replay",
    ):
        response = await client.post(path)
        if response.status_code >= 500:
            bad.append(f"POST {path[:80]} -> {response.status_code} {response.text[:200]}")
    assert not bad, "\n".join(bad)


# --- idempotency ------------------------------------------------------------------------------------------


async def test_same_idempotency_key_and_body_replays_the_job(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/jobs", json=QUEUED_SLEEP, headers=headers)
    second = await client.post("/jobs", json=QUEUED_SLEEP, headers=headers)
    assert first.status_code == second.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert second.json()["token"].startswith("jc1.")
    assert await list_ids(client) == [first.json()["id"]]


async def test_idempotency_ignores_key_order_and_whitespace(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-43", "Content-Type": "application/json"}
    first = await client.post("/jobs", content=b'{"type":"sleep","params":{"seconds":5,"steps":2}}', headers=headers)
    second = await client.post(
        "/jobs", content=b'{\n  "params" : { "steps" : 2,\t"seconds" : 5 } ,\n  "type" : "sleep"\n}', headers=headers
    )
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert await list_ids(client) == [first.json()["id"]]


async def test_idempotency_compares_the_validated_submission_not_its_bytes(client: httpx.AsyncClient) -> None:
    """0 and 0.0 are one number; a default spelled out (priority, a param) is the same submission."""
    headers = {"Idempotency-Key": "order-45", "Content-Type": "application/json"}
    first = await client.post("/jobs", content=b'{"type":"sleep","params":{"seconds":0}}', headers=headers)
    spelled_out = [
        b'{"type":"sleep","params":{"seconds":0.0}}',
        b'{"type":"sleep","params":{"seconds":0},"priority":"normal"}',
    ]
    assert first.status_code == 202, first.text
    for body in spelled_out:
        again = await client.post("/jobs", content=body, headers=headers)
        assert again.status_code == 202, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
    other = await client.post("/jobs", content=b'{"type":"sleep","params":{"seconds":0.5}}', headers=headers)
    assert_problem(other, 422, "Idempotency-Key")


async def test_same_idempotency_key_with_another_body_is_422(client: httpx.AsyncClient, redis: Redis) -> None:
    headers = {"Idempotency-Key": "order-44"}
    first = await client.post("/jobs", json=QUEUED_SLEEP, headers=headers)
    assert first.status_code == 202
    before = await keys(redis)
    other = await client.post("/jobs", json={"type": "sleep", "params": {"seconds": 6}}, headers=headers)
    body = assert_problem(other, 422, "Idempotency-Key", first.json()["id"])
    assert body["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await keys(redis) == before
    assert await list_ids(client) == [first.json()["id"]]


async def test_idempotency_keys_are_per_tenant(client: httpx.AsyncClient) -> None:
    acme = await client.post("/jobs", json=QUEUED_SLEEP, headers={"Idempotency-Key": "shared"})
    globex = await client.post("/jobs", json=QUEUED_SLEEP, headers={**GLOBEX, "Idempotency-Key": "shared"})
    assert acme.status_code == globex.status_code == 202
    assert acme.json()["id"] != globex.json()["id"]
    assert "idempotent-replayed" not in globex.headers
    assert await list_ids(client) == [acme.json()["id"]]
    assert [j["id"] for j in (await client.get("/jobs", headers=GLOBEX)).json()["items"]] == [globex.json()["id"]]
    # ... and a different body under the same key is fine for the other tenant too.
    again = await client.post(
        "/jobs", json={"type": "sleep", "params": {"seconds": 9}}, headers={**GLOBEX, "Idempotency-Key": "shared"}
    )
    assert_problem(again, 422)


async def test_replay_returns_the_original_job_even_after_it_changed(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-45"}
    first = await client.post("/jobs", json=QUEUED_SLEEP, headers=headers)
    assert (await client.post(f"/jobs/{first.json()['id']}/cancel")).status_code == 200
    replay = await client.post("/jobs", json=QUEUED_SLEEP, headers=headers)
    assert replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"] and replay.json()["status"] == "cancelled"
    assert replay.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("key", ["k" * 256, "k" * 300, "", "tab\there"])
async def test_invalid_idempotency_key_is_400(client: httpx.AsyncClient, redis: Redis, key: str) -> None:
    await assert_rejected_without_writes(
        client, redis, 400, "Idempotency-Key", json=QUEUED_SLEEP, headers={"Idempotency-Key": key}
    )


async def test_idempotency_key_of_255_characters_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", json=QUEUED_SLEEP, headers={"Idempotency-Key": "k" * 255})
    assert response.status_code == 202


# --- GET /jobs/{id}: ETag, Retry-After, long-poll ----------------------------------------------------------


async def test_etag_and_if_none_match(client: httpx.AsyncClient) -> None:
    submitted = await client.post("/jobs", json=QUEUED_SLEEP)
    job_id = submitted.json()["id"]
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200
    tag = response.headers["etag"]
    assert tag.startswith('"') and tag.endswith('"')
    assert submitted.headers["etag"] == tag  # nothing changed since the submission

    for header in (tag, f"W/{tag}", f'"other", {tag}'):
        cached = await client.get(f"/jobs/{job_id}", headers={"If-None-Match": header})
        assert cached.status_code == 304, header
        assert cached.content == b""
        assert cached.headers["etag"] == tag

    stale = await client.get(f"/jobs/{job_id}", headers={"If-None-Match": '"job_x-1"'})
    assert stale.status_code == 200 and stale.json()["id"] == job_id

    # A change gives a new ETag, and the old one no longer matches.
    cancelled = await client.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    after = await client.get(f"/jobs/{job_id}", headers={"If-None-Match": tag})
    assert after.status_code == 200 and after.headers["etag"] != tag
    assert after.json()["status"] == "cancelled"


async def test_retry_after_while_queued_and_gone_once_terminal(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    queued = await client.get(f"/jobs/{ticket['id']}")
    assert queued.json()["status"] == "queued"
    assert int(queued.headers["retry-after"]) >= 1
    await client.post(f"/jobs/{ticket['id']}/cancel")
    cancelled = await client.get(f"/jobs/{ticket['id']}")
    assert cancelled.json()["status"] == "cancelled"
    assert "retry-after" not in cancelled.headers


async def test_retry_after_while_processing_and_gone_once_completed(
    client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    ticket = await submit(client, params={"seconds": 30, "steps": 300})
    await wait_for_status(client, ticket["id"], "processing")
    processing = await client.get(f"/jobs/{ticket['id']}")
    assert processing.json()["status"] == "processing"
    assert int(processing.headers["retry-after"]) >= 1
    assert (await client.post(f"/jobs/{ticket['id']}/cancel")).status_code == 202
    await wait_for_status(client, ticket["id"], "cancelled", timeout=5)

    quick = await submit(client, params={"seconds": 0, "steps": 1})
    await wait_for_status(client, quick["id"], "completed")
    completed = await client.get(f"/jobs/{quick['id']}")
    assert "retry-after" not in completed.headers
    assert "etag" in completed.headers


async def test_long_poll_without_change_answers_304_after_the_wait(client: httpx.AsyncClient) -> None:
    submitted = await client.post("/jobs", json=QUEUED_SLEEP)  # no worker: it stays queued
    started = time.monotonic()
    response = await client.get(
        f"/jobs/{submitted.json()['id']}",
        params={"wait": "2"},
        headers={"If-None-Match": submitted.headers["etag"]},
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 304
    assert response.content == b""
    assert elapsed >= 1.9, elapsed  # held for its wait (load only makes it longer)


async def test_long_poll_is_woken_by_a_change_made_through_the_api(
    client: httpx.AsyncClient, server: ServerHandle
) -> None:
    submitted = await client.post("/jobs", json=QUEUED_SLEEP)
    job_id = submitted.json()["id"]
    poll = asyncio.create_task(
        client.get(
            f"/jobs/{job_id}", params={"wait": str(LONG_WAIT_S)}, headers={"If-None-Match": submitted.headers["etag"]}
        )
    )
    await wait_until(lambda: _true(hub_of(server).subscriber_count == 1))  # the poll is parked
    assert not poll.done()
    async with before_the_wait_ends():
        assert (await client.post(f"/jobs/{job_id}/cancel")).status_code == 200
        response = await poll
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.headers["etag"] != submitted.headers["etag"]


async def test_long_poll_returns_early_when_a_worker_moves_the_job(
    client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    submitted = await client.post("/jobs", json={"type": "sleep", "params": {"seconds": 0.5, "steps": 1}})
    async with before_the_wait_ends():
        response = await client.get(
            f"/jobs/{submitted.json()['id']}",
            params={"wait": str(LONG_WAIT_S)},
            headers={"If-None-Match": submitted.headers["etag"]},
        )
    assert response.status_code == 200
    assert response.headers["etag"] != submitted.headers["etag"]
    assert response.json()["status"] in ("processing", "completed")


async def test_long_poll_on_a_terminal_job_returns_at_once(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    cancelled = await client.post(f"/jobs/{ticket['id']}/cancel")
    tag = cancelled.headers["etag"]
    wait = {"wait": str(LONG_WAIT_S)}
    async with before_the_wait_ends():
        response = await client.get(f"/jobs/{ticket['id']}", params=wait)
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        cached = await client.get(f"/jobs/{ticket['id']}", params=wait, headers={"If-None-Match": tag})
    assert cached.status_code == 304


async def test_long_poll_with_a_stale_etag_returns_at_once(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    async with before_the_wait_ends():
        response = await client.get(
            f"/jobs/{ticket['id']}", params={"wait": str(LONG_WAIT_S)}, headers={"If-None-Match": '"old"'}
        )
    assert response.status_code == 200 and response.json()["status"] == "queued"


async def test_job_resource_has_the_documented_shape(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, "report", params={"rows": 1000}, priority="high")
    job = (await client.get(f"/jobs/{ticket['id']}")).json()
    assert job["id"].startswith("job_") and job["type"] == "report" and job["status"] == "queued"
    assert job["params"] == {"rows": 1000, "seed": 0}  # defaults filled in
    assert job["priority"] == "high"
    assert job["attempt"] == 1 and job["max_attempts"] == 3
    assert job["progress"]["percent"] == 0.0
    assert RFC3339_Z.match(job["created_at"]) and job["created_at"] == job["updated_at"]
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["history"] == [{"status": "queued", "at": job["created_at"], "attempt": 1}]
    assert job["result"] is None and job["error"] is None
    base = f"/jobs/{job['id']}"
    assert job["links"] == {
        "self": base,
        "events": base + "/events",
        "cancel": base + "/cancel",
        "result": base + "/result",
    }


# --- GET /jobs ----------------------------------------------------------------------------------------------


async def test_listing_is_newest_first_and_pages_cover_every_job_once(client: httpx.AsyncClient) -> None:
    created = [(await submit(client, params=QUEUED_PARAMS))["id"] for _ in range(7)]
    newest_first = created[::-1]
    assert await list_ids(client) == newest_first
    listing = (await client.get("/jobs")).json()
    stamps = [item["created_at"] for item in listing["items"]]
    assert stamps == sorted(stamps, reverse=True)
    assert all("token" not in item for item in listing["items"])

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/jobs", params=params)).json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 5, "pagination does not end"
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [job_id for page in pages for job_id in page] == newest_first


async def test_pagination_when_the_last_page_is_full(client: httpx.AsyncClient) -> None:
    created = [(await submit(client, params=QUEUED_PARAMS))["id"] for _ in range(4)]
    first = (await client.get("/jobs", params={"limit": "2"})).json()
    second = (await client.get("/jobs", params={"limit": "2", "cursor": first["next_cursor"]})).json()
    assert [i["id"] for i in first["items"] + second["items"]] == created[::-1]
    assert second["next_cursor"] is None
    exact = (await client.get("/jobs", params={"limit": "4"})).json()
    assert len(exact["items"]) == 4 and exact["next_cursor"] is None


async def test_listing_filters_by_status_and_type(client: httpx.AsyncClient) -> None:
    sleeps = [(await submit(client, params=QUEUED_PARAMS))["id"] for _ in range(3)]
    reports = [(await submit(client, "report", params={"rows": 10}))["id"] for _ in range(3)]
    cancelled = {sleeps[0], reports[1], reports[2]}
    for job_id in cancelled:
        assert (await client.post(f"/jobs/{job_id}/cancel")).status_code == 200
    everything = (sleeps + reports)[::-1]

    def expect(predicate: Any) -> list[str]:
        return [j for j in everything if predicate(j)]

    assert await list_ids(client, status="cancelled") == expect(lambda j: j in cancelled)
    assert await list_ids(client, status="queued") == expect(lambda j: j not in cancelled)
    assert await list_ids(client, status="completed") == []
    assert await list_ids(client, type="report") == expect(lambda j: j in reports)
    assert await list_ids(client, type="sleep") == expect(lambda j: j in sleeps)
    assert await list_ids(client, status="cancelled", type="report") == [reports[2], reports[1]]
    assert await list_ids(client, status="queued", type="report") == [reports[0]]
    assert await list_ids(client, status="cancelled", type="sleep") == [sleeps[0]]
    items = (await client.get("/jobs", params={"status": "cancelled"})).json()["items"]
    assert {item["status"] for item in items} == {"cancelled"}


async def test_filtered_pagination_covers_every_match_once(client: httpx.AsyncClient) -> None:
    ids = [(await submit(client, params=QUEUED_PARAMS))["id"] for _ in range(5)]
    for job_id in ids[1::2]:
        await client.post(f"/jobs/{job_id}/cancel")
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params = {"limit": "1", "status": "queued", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/jobs", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert cursor is None
    assert seen == ids[::2][::-1]


# --- POST /jobs/{id}/cancel ---------------------------------------------------------------------------------


async def test_cancel_a_queued_job_then_again_is_409(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    response = await client.post(f"/jobs/{ticket['id']}/cancel")
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "cancelled" and job["id"] == ticket["id"]
    assert [h["status"] for h in job["history"]] == ["queued", "cancelled"]
    assert job["finished_at"] is not None
    again = await client.post(f"/jobs/{ticket['id']}/cancel")
    body = assert_problem(again, 409, "cancelled")
    assert (await client.get(f"/jobs/{ticket['id']}")).json()["history"] == job["history"]
    assert body["status"] == 409


async def test_cancel_a_completed_job_is_409(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, params={"seconds": 0, "steps": 1})
    await wait_for_status(client, ticket["id"], "completed")
    assert_problem(await client.post(f"/jobs/{ticket['id']}/cancel"), 409, "completed")
    assert (await client.get(f"/jobs/{ticket['id']}")).json()["status"] == "completed"


@pytest.mark.parametrize("job_id", [new_job_id(), "nope", "job_123"])
async def test_cancel_an_unknown_job_is_404(client: httpx.AsyncClient, redis: Redis, job_id: str) -> None:
    before = await keys(redis)
    assert_problem(await client.post(f"/jobs/{job_id}/cancel"), 404, job_id)
    assert await keys(redis) == before


# --- GET /jobs/{id}/result ---------------------------------------------------------------------------------


async def test_result_before_completion_is_409(client: httpx.AsyncClient) -> None:
    ticket = await submit(client, params=QUEUED_PARAMS)
    assert_problem(await client.get(f"/jobs/{ticket['id']}/result"), 409, "queued")
    assert_problem(await client.get(f"/jobs/{ticket['id']}/result", headers={"Accept": "text/csv"}), 409)
    await client.post(f"/jobs/{ticket['id']}/cancel")
    assert_problem(await client.get(f"/jobs/{ticket['id']}/result"), 409, "cancelled")


async def test_result_of_an_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"/jobs/{new_job_id()}/result"), 404)


async def test_report_result_as_json_and_as_csv(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, "report", params={"rows": 1000, "seed": 1})
    job = await wait_for_status(client, ticket["id"], "completed")

    response = await client.get(f"/jobs/{ticket['id']}/result")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    result = response.json()
    assert result == job["result"]
    assert result["rows"] == 1000 and result["seed"] == 1
    assert result["totals"]["count"] == 1000 == sum(g["count"] for g in result["groups"])

    as_csv = await client.get(f"/jobs/{ticket['id']}/result", headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    disposition = as_csv.headers["content-disposition"]
    assert disposition.startswith("attachment") and f'filename="{ticket["id"]}.csv"' in disposition
    rows = list(csv.reader(io.StringIO(as_csv.text)))
    assert rows[0] == ["region", "category", "count", "quantity", "revenue", "average_price"]
    assert len(rows) == 1 + len(result["groups"]) + 1
    assert rows[-1][0] == "TOTAL" and int(rows[-1][2]) == 1000
    assert [(r[0], r[1], int(r[2])) for r in rows[1:-1]] == [
        (g["region"], g["category"], g["count"]) for g in result["groups"]
    ]

    # A browser-style Accept that lists CSV among others still gets the CSV.
    mixed = await client.get(f"/jobs/{ticket['id']}/result", headers={"Accept": "text/csv, application/json;q=0.5"})
    assert mixed.headers["content-type"].startswith("text/csv")


async def test_csv_of_a_type_without_csv_is_406(client: httpx.AsyncClient, worker: JobcastWorker) -> None:
    ticket = await submit(client, params={"seconds": 0, "steps": 1})
    await wait_for_status(client, ticket["id"], "completed")
    assert_problem(await client.get(f"/jobs/{ticket['id']}/result", headers={"Accept": "text/csv"}), 406, "json")
    plain = await client.get(f"/jobs/{ticket['id']}/result")
    assert plain.status_code == 200 and plain.json() == {"slept": 0.0}


# --- job types, health ----------------------------------------------------------------------------------------


async def test_job_types_describe_sleep_and_report(client: httpx.AsyncClient) -> None:
    response = await client.get("/job-types")
    assert response.status_code == 200
    types = {item["name"]: item for item in response.json()["items"]}
    assert {"sleep", "report"} <= set(types)
    for item in types.values():
        assert isinstance(item["description"], str) and item["description"]
        assert item["params_schema"]["type"] == "object"
        assert item["timeout_s"] > 0 and item["max_attempts"] >= 1
    sleep, report = types["sleep"], types["report"]
    assert set(sleep["params_schema"]["properties"]) == {"seconds", "steps", "fail_times", "fail"}
    assert sleep["params_schema"]["properties"]["seconds"]["maximum"] == 3600
    assert set(report["params_schema"]["properties"]) == {"rows", "seed"}
    assert report["params_schema"]["required"] == ["rows"]
    assert sleep["timeout_s"] == 3700 and report["timeout_s"] == 1800
    assert sleep["max_attempts"] == report["max_attempts"] == 3
    assert "csv" in report["result_formats"] and "csv" not in sleep["result_formats"]


async def test_health_and_readiness_need_no_credentials(anon: httpx.AsyncClient) -> None:
    health = await anon.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = await anon.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "redis": "ok", "workers": 0}


# --- capacity ----------------------------------------------------------------------------------------------


async def test_at_capacity_submissions_are_503_and_store_nothing(redis_server: RedisProcess, redis: Redis) -> None:
    handle = ServerHandle(make_settings(redis_server.url, max_queued=2, max_queued_per_tenant=0))
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers={"Authorization": "Bearer key-acme"}) as c:
            first = await c.post("/jobs", json=QUEUED_SLEEP, headers={"Idempotency-Key": "first"})
            second = await c.post("/jobs", json=QUEUED_SLEEP)
            assert first.status_code == second.status_code == 202
            before = await keys(redis)

            full = await c.post("/jobs", json=QUEUED_SLEEP)
            assert_problem(full, 503, "capacity")
            assert int(full.headers["retry-after"]) > 0
            full_other = await c.post("/jobs", json=QUEUED_SLEEP, headers={**GLOBEX, "Idempotency-Key": "x"})
            assert_problem(full_other, 503)
            assert await keys(redis) == before
            assert await list_ids(c) == [second.json()["id"], first.json()["id"]]

            # A replay of an accepted submission is not a new job: it is answered even when full.
            replay = await c.post("/jobs", json=QUEUED_SLEEP, headers={"Idempotency-Key": "first"})
            assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]

            # Capacity counts queued jobs: cancelling one makes room for one.
            assert (await c.post(f"/jobs/{first.json()['id']}/cancel")).status_code == 200
            assert (await c.post("/jobs", json=QUEUED_SLEEP)).status_code == 202
            assert (await c.post("/jobs", json=QUEUED_SLEEP)).status_code == 503
    finally:
        await handle.stop()


async def test_unknown_query_parameters_are_a_400_naming_them(client: httpx.AsyncClient, redis: Redis) -> None:
    response = await client.get("/jobs", params={"limt": "5"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "'limt'" in response.json()["detail"] and "limit" in response.json()["detail"]
    # A token in the query is a credential, not an unknown parameter: scope rules still answer.
    token = (await client.post("/tokens")).json()["token"]
    async with httpx.AsyncClient(base_url=str(client.base_url)) as anonymous:
        assert (await anonymous.post("/tokens", params={"token": token})).status_code == 403


async def test_inputs_the_reviewers_broke_us_with_are_4xx(client: httpx.AsyncClient, redis: Redis) -> None:
    keys_before = await redis.dbsize()
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(300):
        cursor["a"] = {}
        cursor = cursor["a"]
    nested = await client.post("/jobs", json={"type": "sleep", "params": deep})
    assert nested.status_code == 422 and "deeper than 64" in nested.json()["detail"]
    bad_host = await client.post(
        "/jobs", json={"type": "sleep", "webhook": {"url": "http://" + "a" * 64 + ".example.com/hook"}}
    )
    assert bad_host.status_code == 422 and "not a valid host name" in bad_host.json()["detail"]
    empty_label = await client.post("/jobs", json={"type": "sleep", "webhook": {"url": "http://a..b.com/hook"}})
    assert empty_label.status_code == 422
    assert await redis.dbsize() == keys_before  # refused, so nothing written
    ticket = await submit(client, params=QUEUED_PARAMS)
    huge = await client.get(f"/jobs/{ticket['id']}/events", headers={"Last-Event-ID": "99999999999999999999-0"})
    assert huge.status_code == 400


# --- problem types ------------------------------------------------------------------------------------------


async def test_every_problem_type_uri_is_served_by_the_server(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A problem's ``type`` resolves here (no invented domain), to its status, title and description."""
    answers = [
        await client.get("/nope"),
        await client.delete("/jobs"),
        await client.get(f"/jobs/{new_job_id()}"),
        await client.post("/jobs", json={"type": "nope"}),
        await client.get("/jobs", params={"limit": "x"}),
        await anon.get("/jobs"),
    ]
    seen = set()
    for response in answers:
        problem = response.json()
        assert problem["type"].startswith("/problems/"), problem
        described = await anon.get(problem["type"])
        assert described.status_code == 200, described.text
        assert described.json()["status"] == problem["status"] == response.status_code
        assert described.json()["title"] == problem["title"]
        assert len(described.json()["description"]) > 20
        seen.add(problem["type"])
    assert seen == {f"/problems/{slug}" for slug in ("not-found", "method-not-allowed", "validation",
                                                      "bad-request", "unauthorized")}  # fmt: skip
    assert_problem(await anon.get("/problems/teapot"), 404, "problem type")


async def _true(value: Any) -> bool:
    return bool(value)
