"""The HTTP endpoints of API.md (jobs, job types, tokens, health).

Each route authenticates first, validates everything it was given (raising a :mod:`server.problems`
exception on the first thing wrong, before anything is written), then makes one store call.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
from typing import Any, TypedDict, cast

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from worker.clock import rfc3339
from worker.ids import is_job_id
from worker.models import JobStatus, Submission
from worker.settings import Settings
from worker.store import JobRecord, Store
from worker.types import Registry
from worker.webhooks import WebhookRejected, WebhookStore, accept_webhook

from .auth import Authenticator
from .hub import Audience, Hub
from .limits import RateLimiter, StreamSlots
from .metrics import WORKER_LIVE_S
from .metrics import render as render_metrics
from .openapi import IDEMPOTENCY_KEY_PATTERN
from .problems import (
    BadRequest,
    Conflict,
    Forbidden,
    GoneProblem,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from .resources import etag, job_resource
from .sse import EventStream, Gone, StreamConfig, check_continuity, valid_stream_id

MAX_BODY = 1024 * 1024
IDEMPOTENCY_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)
MAX_WAIT_S = 60
MAX_LIMIT = 200
DEFAULT_LIMIT = 50
POLL_HINT_S = "1"


class State(TypedDict):
    settings: Settings
    redis: Redis
    store: Store
    hub: Hub
    registry: Registry
    auth: Authenticator
    rate_limiter: RateLimiter | None
    stream_slots: StreamSlots
    openapi: bytes
    webhooks: WebhookStore


def _state(request: Request) -> State:
    return cast(State, request.state._state)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


# --- request parsing ------------------------------------------------------------------------------


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    too_large = PayloadTooLarge(f"The request body is larger than {limit} bytes (1 MiB); send less data.")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise too_large
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request) -> tuple[dict[str, Any], bytes]:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"The body must be JSON, sent with 'Content-Type: application/json' (got {content_type!r})."
        )
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The body is not valid JSON ({exc}). Send a JSON object.") from None
    if not isinstance(body, dict):
        raise ValidationFailed(
            'The body must be a JSON object, e.g. {"type": "sleep", "params": {}}.',
            errors=[{"loc": ["body"], "msg": "must be a JSON object", "type": "object_type"}],
        )
    return body, raw


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"Query parameter '{name}' must be an integer from {low} to {high}.") from None
    if not low <= value <= high:
        raise BadRequest(f"Query parameter '{name}' must be from {low} to {high} (got {value}).")
    return value


def query_wait(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_WAIT_S:  # also false for NaN
        raise BadRequest(f"Query parameter 'wait' must be a number of seconds from 0 to {MAX_WAIT_S}.")
    return value


def decode_cursor(cursor: str) -> str:
    """A cursor is the id of the last job of the previous page: the next page starts below it."""
    if not is_job_id(cursor):
        raise BadRequest(
            "Query parameter 'cursor' is malformed; pass the 'next_cursor' of the previous page unchanged."
        )
    return cursor


def job_id_param(request: Request) -> str:
    return str(request.path_params["job_id"])


def not_found(job_id: str) -> NotFound:
    return NotFound(f"No job {job_id!r} for this tenant. Check the id; GET /jobs lists your jobs.")


async def load_job(request: Request, state: State, job_id: str, tenant: str) -> JobRecord:
    record = await state["store"].get(job_id, tenant)
    if record is None:
        raise not_found(job_id)
    return record


# --- jobs -----------------------------------------------------------------------------------------


def render_job(record: JobRecord, request: Request, status: int = 200, extra: dict[str, Any] | None = None) -> Response:
    tag = etag(record)
    headers = {"ETag": tag, "Cache-Control": "no-cache"}
    if not record.terminal:
        headers["Retry-After"] = POLL_HINT_S
    if status == 200 and extra is None and tag in _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    body = job_resource(record)
    if extra:
        body.update(extra)
    return json_response(body, status, headers)


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {part.strip().removeprefix("W/") for part in header.split(",")}


SAFE_INTEGER = 2**53
MAX_PARAMS_DEPTH = 64


def _depth(value: Any, limit: int = MAX_PARAMS_DEPTH + 1) -> int:
    """How deep ``value`` nests, counting no further than ``limit`` (no recursion limit to hit)."""
    depth, level = 0, [value]
    while level and depth < limit:
        depth += 1
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
            if isinstance(child, dict | list)
        ]
    return depth


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


async def submit_job(request: Request) -> Response:
    state = _state(request)
    principal = await state["auth"].require(request, "write")
    body, _ = await read_json_object(request)
    try:
        submission = Submission.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed.from_pydantic(exc) from None
    jt = state["registry"].get(submission.type)
    if jt is None:
        known = ", ".join(t.name for t in state["registry"])
        raise ValidationFailed(
            f"Unknown job type {submission.type!r}. Registered types: {known} (GET /job-types describes them).",
            errors=[{"loc": ["body", "type"], "msg": f"unknown job type; one of: {known}", "type": "job_type"}],
        )
    try:
        # Strict, as JSON: "5" is not a number (but an ISO string is a datetime). JSON Schema counts
        # 3.0 as an integer, so integral floats are passed as integers.
        if _depth(submission.params) > MAX_PARAMS_DEPTH:
            raise ValidationFailed(
                f"params nest deeper than {MAX_PARAMS_DEPTH} levels; flatten them.",
                errors=[{"loc": ["body", "params"], "msg": f"nested deeper than {MAX_PARAMS_DEPTH}", "type": "depth"}],
            )
        params_json = orjson.dumps(_integral_floats_as_ints(submission.params))
        params = jt.params.model_validate_json(params_json, strict=True).model_dump(mode="json")
    except ValidationError as exc:
        raise ValidationFailed.from_pydantic(exc, prefix=("body", "params")) from None
    webhook = None
    if submission.webhook is not None:
        try:
            webhook = await accept_webhook(submission.webhook, principal.tenant, state["settings"])
        except WebhookRejected as exc:
            loc = ["body", "webhook", *([exc.field] if exc.field else [])]
            raise ValidationFailed(str(exc), errors=[{"loc": loc, "msg": str(exc), "type": "webhook"}]) from None
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise BadRequest("The Idempotency-Key header must be 1 to 255 printable ASCII characters.")
    fingerprint = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()

    rate_headers: dict[str, str] = {}
    limiter = state["rate_limiter"]
    if limiter is not None:
        decision = await limiter.take(principal.tenant)
        rate_headers = decision.headers
        if not decision.allowed:
            raise TooManyRequests(
                f"This tenant may submit {limiter.limit} jobs per {limiter.window_s:g} s; that is used up. "
                f"Retry in {decision.retry_after_s} s (see the Retry-After and RateLimit headers).",
                headers=rate_headers,
            )

    created = await state["store"].create(
        tenant=principal.tenant,
        job_type=jt.name,
        params=params,
        priority=submission.priority or jt.priority,
        max_attempts=jt.max_attempts,
        webhook=webhook,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    if created.outcome == "full":
        raise Unavailable(
            f"Jobcast is at capacity ({state['settings'].max_queued} queued jobs). Retry after the indicated delay.",
            retry_after=10,
            headers=dict(rate_headers),
        )
    assert created.job_id is not None
    if created.outcome == "conflict":
        raise ValidationFailed(
            "This Idempotency-Key was already used with a different body (for job "
            f"{created.job_id}). Use a new key for a new submission, or resend the original body.",
            errors=[
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "reused with a different body",
                    "type": "idempotency",
                }
            ],
        )
    record = created.record or await load_job(request, state, created.job_id, principal.tenant)
    token, expires_at = state["auth"].signer.mint("job", principal.tenant, state["settings"].job_token_ttl_s, record.id)
    response = render_job(record, request, 202, {"token": token, "token_expires_at": rfc3339(expires_at * 10**9)})
    response.headers["Location"] = f"/jobs/{record.id}"
    response.headers["Retry-After"] = POLL_HINT_S
    response.headers.update(rate_headers)
    if created.outcome == "existing":
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def jobs(request: Request) -> Response:
    """``/jobs``: one route for both methods, so that a 405 lists both in its Allow header."""
    return await (submit_job(request) if request.method == "POST" else list_jobs(request))


async def get_job(request: Request) -> Response:
    state = _state(request)
    job_id = job_id_param(request)
    principal = await state["auth"].require(request, "read", job_id=job_id)
    wait = query_wait(request)
    record = await load_job(request, state, job_id, principal.tenant)
    seen = _etags(request.headers.get("if-none-match"))
    if wait > 0 and not record.terminal and (not seen or etag(record) in seen):
        record = await _wait_for_change(state, record, wait)
    return render_job(record, request)


async def _wait_for_change(state: State, record: JobRecord, wait: float) -> JobRecord:
    """Hold until the job's version moves past ``record``'s, or ``wait`` seconds pass.

    Woken by the hub (the job's events), never by a sleep loop. The record is read again after
    subscribing, so a change between the first read and the subscription is not missed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    with state["hub"].subscribe("job", record.id) as sub:
        while True:
            # Forget what woke us before reading, so a change during the read wakes us again.
            sub.items.clear()
            sub.resync = sub.overflowed = False
            current = await state["store"].get(record.id, record.tenant)
            if current is None:
                return record
            if current.version != record.version or current.terminal:
                return current
            remaining = deadline - loop.time()
            if remaining <= 0 or sub.closed:
                return current
            await sub.wait(remaining)


async def list_jobs(request: Request) -> Response:
    state = _state(request)
    principal = await state["auth"].require(request, "read")
    status_raw = request.query_params.get("status")
    status = None
    if status_raw is not None:
        try:
            status = JobStatus(status_raw)
        except ValueError:
            allowed = ", ".join(s.value for s in JobStatus)
            raise BadRequest(f"Query parameter 'status' must be one of: {allowed}.") from None
    job_type = request.query_params.get("type")
    if job_type is not None and state["registry"].get(job_type) is None:
        known = ", ".join(t.name for t in state["registry"])
        raise BadRequest(f"Query parameter 'type' must be a registered job type: {known}.")
    limit = query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    cursor_raw = request.query_params.get("cursor")
    before = decode_cursor(cursor_raw) if cursor_raw is not None else None
    records, next_id = await state["store"].list_jobs(
        principal.tenant, status=status, job_type=job_type, limit=limit, before=before
    )
    return json_response(
        {
            "items": [job_resource(r) for r in records],
            "next_cursor": next_id,
        }
    )


async def cancel_job(request: Request) -> Response:
    state = _state(request)
    job_id = job_id_param(request)
    principal = await state["auth"].require(request, "write")
    outcome, status = await state["store"].cancel(job_id, principal.tenant)
    if outcome == "missing":
        raise not_found(job_id)
    if outcome == "terminal":
        raise Conflict(f"Job {job_id} is already {status}; a finished job cannot be cancelled.", job_status=status)
    record = await load_job(request, state, job_id, principal.tenant)
    return render_job(record, request, 200 if outcome == "cancelled" else 202, {})


async def get_result(request: Request) -> Response:
    state = _state(request)
    job_id = job_id_param(request)
    principal = await state["auth"].require(request, "read", job_id=job_id)
    record = await load_job(request, state, job_id, principal.tenant)
    if record.status is not JobStatus.COMPLETED:
        raise Conflict(
            f"Job {job_id} is {record.status.value}; its result is available once it is completed. "
            f"Follow it with GET /jobs/{job_id}?wait=30.",
            job_status=record.status.value,
        )
    accept = request.headers.get("accept", "")
    if "text/csv" in accept:
        jt = state["registry"].get(record.type)
        if jt is None or jt.csv is None:
            raise NotAcceptable(f"Job type {record.type!r} has no CSV form; ask for application/json.")
        return Response(
            jt.csv(record.result),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.csv"'},
        )
    return json_response(record.result)


# --- event streams ---------------------------------------------------------------------------------


def last_event_id(request: Request) -> str | None:
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if value is None or value == "":
        return None
    if not valid_stream_id(value):
        raise BadRequest(
            f"Last-Event-ID {value[:60]!r} is not an event id of this stream (ids look like "
            "'1732896301123-0'). Reconnect without it to start over."
        )
    return value


async def _open_stream(request: Request, audience: Audience, key: str, last_id: str | None) -> None:
    state = _state(request)
    if last_id is not None:
        try:
            await check_continuity(state["store"], audience, key, last_id)
        except Gone:
            raise GoneProblem(
                f"Events after {last_id} are no longer in the log (it is capped). Reconnect without "
                "Last-Event-ID, after reloading the current state with GET /jobs."
            ) from None


def event_stream(state: State, tenant: str, audience: Audience, key: str, last_id: str | None) -> EventStream:
    """The stream of one job (replayed from its start without a last id) or of a tenant (live)."""
    settings = state["settings"]
    return EventStream(
        hub=state["hub"],
        store=state["store"],
        audience=audience,
        key=key,
        last_id=last_id,
        replay=audience == "job",
        config=StreamConfig(ping_s=settings.sse_ping_s, send_timeout_s=settings.sse_send_timeout_s),
        slots=state["stream_slots"],
        tenant=tenant,
    )


async def job_events(request: Request) -> Response | EventStream:
    state = _state(request)
    job_id = job_id_param(request)
    principal = await state["auth"].require(request, "read", job_id=job_id)
    last_id = last_event_id(request)
    record = await load_job(request, state, job_id, principal.tenant)
    await _open_stream(request, "job", job_id, last_id)
    if record.terminal and last_id is not None:
        later = await state["store"].log_events("job", job_id, after=last_id, count=1)
        if not later:
            return Response(status_code=204)  # the stream is over; EventSource stops reconnecting
    return event_stream(state, principal.tenant, "job", job_id, last_id)


async def tenant_events(request: Request) -> EventStream:
    state = _state(request)
    principal = await state["auth"].require(request, "read")
    if principal.kind == "job":
        raise Forbidden("A job token reads only its own job; use a stream token (POST /tokens) for GET /events.")
    last_id = last_event_id(request)
    await _open_stream(request, "tenant", principal.tenant, last_id)
    return event_stream(state, principal.tenant, "tenant", principal.tenant, last_id)


# --- job types, tokens, health ----------------------------------------------------------------------


async def list_job_types(request: Request) -> Response:
    state = _state(request)
    await state["auth"].require(request, "read")
    return json_response(
        {
            "items": [
                {
                    "name": jt.name,
                    "description": jt.description,
                    "params_schema": jt.params_schema(),
                    "timeout_s": jt.timeout_s,
                    "max_attempts": jt.max_attempts,
                    "priority": jt.priority.value,
                    "result_formats": ["json", "csv"] if jt.csv else ["json"],
                }
                for jt in state["registry"]
            ]
        }
    )


async def create_token(request: Request) -> Response:
    state = _state(request)
    principal = await state["auth"].require(request, "write")
    token, expires_at = state["auth"].signer.mint("stream", principal.tenant, state["settings"].stream_token_ttl_s)
    return json_response({"token": token, "expires_at": rfc3339(expires_at * 10**9)}, 201)


async def metrics(request: Request) -> Response:
    state = _state(request)
    token = state["settings"].metrics_token
    if token and not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
        raise Unauthorized("GET /metrics needs 'Authorization: Bearer <JOBCAST_METRICS_TOKEN>'.")
    body = await render_metrics(state["store"], state["hub"], state["stream_slots"])
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return Response(_state(request)["openapi"], media_type="application/json")


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when Redis answers. The live workers are reported too; with ``?require_workers=true``
    having none is also a 503 (for monitors: a load balancer should keep routing reads and
    submissions to a server even while the workers are down)."""
    state = _state(request)
    require_workers = request.query_params.get("require_workers", "false")
    if require_workers not in ("true", "false"):
        raise BadRequest("Query parameter 'require_workers' must be true or false.")
    try:
        async with asyncio.timeout(2.0):
            await state["redis"].ping()
            workers = await state["store"].live_workers(WORKER_LIVE_S)
    except (RedisError, OSError, TimeoutError):
        raise Unavailable("Redis does not answer; this process cannot serve jobs until it does.") from None
    if workers == 0 and require_workers == "true":
        raise Unavailable(
            f"No worker has sent a heartbeat in the last {WORKER_LIVE_S:g} s: jobs would wait. Start `jobcast worker`.",
            workers=0,
        )
    return json_response({"status": "ready", "redis": "ok", "workers": workers})


def routes() -> list[BaseRoute]:
    return [
        Route("/jobs", jobs, methods=["GET", "POST"]),
        Route("/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/jobs/{job_id}/result", get_result, methods=["GET"]),
        Route("/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/events", tenant_events, methods=["GET"]),
        Route("/job-types", list_job_types, methods=["GET"]),
        Route("/tokens", create_token, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
