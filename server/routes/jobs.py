"""``/jobs``: submit, list, read (and long-poll), cancel, and fetch a result.

Each endpoint authenticates first, validates everything it was given (raising a
:mod:`jobcast.problems` exception on the first thing wrong, before anything is written), then makes
one store call. The rules of a valid submission are the domain's (:mod:`jobcast.worker.submissions`);
this module only maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import re

from starlette.requests import Request
from starlette.responses import Response

from jobcast.worker.clock import rfc3339
from jobcast.worker.history import JobQuery
from jobcast.worker.models import JobStatus
from jobcast.worker.records import JobRecord
from jobcast.worker.submissions import AcceptedSubmission, InvalidSubmission, accept_submission

from ..limits import RateLimiter, StreamsFull, streams_full_problem
from ..problems import (
    BadRequest,
    Conflict,
    NotAcceptable,
    Problem,
    TooManyRequests,
    Unavailable,
    ValidationFailed,
)
from ..requests import (
    job_id_param,
    query_cursor,
    query_int,
    query_search,
    query_time,
    query_wait,
    read_json_object,
)
from ..resources import (
    IDEMPOTENCY_KEY_PATTERN,
    POLL_HINT_S,
    JobList,
    etag,
    job_resource,
    json_response,
    matching_etags,
    render_job,
)
from ..services import Cell, Services, job_not_found, services

IDEMPOTENCY_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)
MAX_LIMIT = 200
DEFAULT_LIMIT = 50


async def jobs(request: Request) -> Response:
    """``/jobs``: one route for both methods, so that a 405 lists both in its Allow header."""
    return await (submit_job(request) if request.method == "POST" else list_jobs(request))


async def submit_job(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")
    # Every authenticated attempt counts, valid or not, and before its body is read: a tenant
    # cannot make the server validate hostile bodies faster than it may submit jobs.
    cell = svc.tenant_cell(principal.tenant)
    rate_headers = await take_submission(cell.rate_limiter, principal.tenant)
    try:
        accepted, idempotency_key = await read_submission(request, svc, principal.tenant)
    except Problem as problem:
        problem.headers = {**rate_headers, **problem.headers}
        raise
    created = await cell.store.create(
        tenant=principal.tenant,
        job_type=accepted.job_type.name,
        params=accepted.params,
        priority=accepted.priority,
        max_attempts=accepted.job_type.max_attempts,
        webhook=accepted.webhook,
        idempotency_key=idempotency_key,
        fingerprint=accepted.fingerprint,
    )
    if created.outcome == "full":
        raise Unavailable(
            f"Jobcast is at capacity ({svc.settings.max_queued} queued jobs{_in_cell(svc)}). "
            "Retry after the indicated delay.",
            retry_after=10,
            headers=dict(rate_headers),
        )
    if created.outcome == "tenant_full":
        raise TooManyRequests(
            f"This tenant has {svc.settings.tenant_queue_share} jobs queued, its share of the queue "
            "(JOBCAST_MAX_QUEUED_PER_TENANT). Submit more once some have started, or cancel some.",
            headers={**rate_headers, "Retry-After": "10"},
        )
    assert created.job_id is not None
    if created.outcome == "conflict":
        raise ValidationFailed(
            "This Idempotency-Key was already used with a different body (for job "
            f"{created.job_id}). Use a new key for a new submission, or resend the original body.",
            errors=[
                {"loc": ["header", "Idempotency-Key"], "msg": "reused with a different body", "type": "idempotency"}
            ],
        )
    record = created.record or await svc.load_job(created.job_id, principal.tenant)
    token, expires_at = svc.auth.mint(principal, "job", svc.settings.job_token_ttl_s, record.id)
    response = render_job(record, request, 202, {"token": token, "token_expires_at": rfc3339(expires_at * 10**9)})
    response.headers["Location"] = f"/jobs/{record.id}"
    response.headers["Retry-After"] = POLL_HINT_S
    response.headers.update(rate_headers)
    if created.outcome == "existing":
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _in_cell(svc: Services) -> str:
    """JOBCAST_MAX_QUEUED caps each cell's queue: say so when there are several."""
    return " in this tenant's cell" if len(svc.cells) > 1 else ""


async def take_submission(limiter: RateLimiter | None, tenant: str) -> dict[str, str]:
    """Count one submission attempt of ``tenant`` (with its cell's limiter): its RateLimit headers,
    or a 429 when none is left."""
    if limiter is None:
        return {}
    decision = await limiter.take(tenant)
    if not decision.allowed:
        raise TooManyRequests(
            f"This tenant may submit {limiter.limit} jobs per {limiter.window_s:g} s; that is used up. "
            f"Retry in {decision.retry_after_s} s (see the Retry-After and RateLimit headers).",
            headers=decision.headers,
        )
    return decision.headers


async def read_submission(request: Request, svc: Services, tenant: str) -> tuple[AcceptedSubmission, str | None]:
    """The validated submission and its Idempotency-Key, or the 4xx problem saying what is wrong."""
    body = await read_json_object(request)
    try:
        accepted = await accept_submission(body, tenant=tenant, registry=svc.registry, settings=svc.settings)
    except InvalidSubmission as exc:
        raise ValidationFailed(exc.detail, errors=exc.errors, omitted=exc.omitted) from None
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise BadRequest("The Idempotency-Key header must be 1 to 255 printable ASCII characters.")
    return accepted, idempotency_key


async def list_jobs(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "read")
    status_raw = request.query_params.get("status")
    status = None
    if status_raw is not None:
        try:
            status = JobStatus(status_raw)
        except ValueError:
            allowed = ", ".join(s.value for s in JobStatus)
            raise BadRequest(f"Query parameter 'status' must be one of: {allowed}.") from None
    job_type = request.query_params.get("type")
    if job_type is not None and svc.registry.get(job_type) is None:
        known = ", ".join(t.name for t in svc.registry)
        raise BadRequest(f"Query parameter 'type' must be a registered job type: {known}.")
    limit = query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    query = JobQuery(
        status=status,
        job_type=job_type,
        created_after_ms=query_time(request, "created_after"),
        created_before_ms=query_time(request, "created_before"),
        search=query_search(request),
    )
    before = query_cursor(request)
    records, next_id = await svc.list_jobs(principal.tenant, query, limit, before)
    redact = principal.kind != "key"
    items = [job_resource(r, redact_webhook=redact) for r in records]
    return json_response(JobList(items=items, next_cursor=next_id))


async def get_job(request: Request) -> Response:
    svc = services(request)
    job_id = job_id_param(request)
    principal = await svc.auth.require(request, "read", job_id=job_id)
    wait = query_wait(request)
    record = await svc.load_job(job_id, principal.tenant)
    seen = matching_etags(request)
    if wait > 0 and not record.terminal and (not seen or etag(record) in seen):
        # A held long-poll holds a connection as an event stream does: it takes a stream slot.
        cell = svc.job_cell(job_id)
        try:
            slot = await cell.stream_slots.acquire(principal.tenant)
        except StreamsFull as full:
            raise long_polls_full(full) from None
        try:
            record = await wait_for_change(cell, record, wait)
        finally:
            await cell.stream_slots.release(principal.tenant, slot)
    return render_job(record, request, redact_webhook=principal.kind != "key")


def long_polls_full(full: StreamsFull) -> Problem:
    return streams_full_problem(
        full,
        what="event streams and long-polls (?wait=)",
        tenant_hint="Retry after the indicated delay, or follow many jobs over one GET /events stream.",
        process_hint=", or read the job without ?wait=",
    )


async def wait_for_change(cell: Cell, record: JobRecord, wait: float) -> JobRecord:
    """Hold until the job's version moves past ``record``'s, or ``wait`` seconds pass.

    Woken by the hub (the job's events), never by a sleep loop. The record is read again after
    subscribing, so a change between the first read and the subscription is not missed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with cell.hub.subscribe("job", record.id, record.tenant) as sub:
        while True:
            # Forget what woke us before reading, so a change during the read wakes us again.
            sub.reset()
            current = await cell.store.get(record.id, record.tenant)
            if current is None:
                return record
            if current.version != record.version or current.terminal:
                return current
            remaining = deadline - loop.time()
            if remaining <= 0 or sub.closed:
                return current
            await sub.wait(remaining)


async def cancel_job(request: Request) -> Response:
    svc = services(request)
    job_id = job_id_param(request)
    principal = await svc.auth.require(request, "write")
    outcome, status = await svc.job_cell(job_id).store.cancel(job_id, principal.tenant)
    if outcome == "missing":
        raise job_not_found(job_id)
    if outcome == "terminal":
        raise Conflict(f"Job {job_id} is already {status}; a finished job cannot be cancelled.", job_status=status)
    record = await svc.load_job(job_id, principal.tenant)
    return render_job(record, request, 200 if outcome == "cancelled" else 202, {})


async def get_result(request: Request) -> Response:
    svc = services(request)
    job_id = job_id_param(request)
    principal = await svc.auth.require(request, "read", job_id=job_id)
    record = await svc.load_job(job_id, principal.tenant)
    if record.status is not JobStatus.COMPLETED:
        raise Conflict(
            f"Job {job_id} is {record.status.value}; its result is available once it is completed. "
            f"Follow it with GET /jobs/{job_id}?wait=30.",
            job_status=record.status.value,
        )
    if "text/csv" in request.headers.get("accept", ""):
        jt = svc.registry.get(record.type)
        if jt is None or jt.csv is None:
            raise NotAcceptable(f"Job type {record.type!r} has no CSV form; ask for application/json.")
        return Response(
            jt.csv(record.result),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.csv"'},
        )
    return json_response(record.result)
