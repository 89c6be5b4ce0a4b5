"""The event streams: ``/jobs/{id}/events`` (one job, replayed from its start) and ``/events``
(the tenant's feed, live), both resumable with Last-Event-ID.

Both are served as raw ASGI before Starlette's middleware stack (:func:`match` and :func:`serve`,
called by :class:`jobcast.app.JobcastApp`): a stream lives for hours, and every write of every
stream would otherwise go through two send wrappers. Their Starlette routes remain for the methods
the raw path does not take (HEAD, and the 405 of the others). Answers before the stream starts are
the same problem+json either way.

Opening a stream costs one Redis round trip (``worker/lua/streams.lua``): the job's existence, the
client's last id against the log (trimmed past it: 410; past its newest event: 400; a finished job
with nothing after it: 204), the tenant's stream cap (429) and the first page of the replay. The
process's own cap (503) needs no Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from jobcast.worker.models import Audience
from jobcast.worker.store import Event

from .. import resumes, streamids
from ..frames import position_frame, retry_frame
from ..limits import StreamsFull, streams_full_problem
from ..openapi import refuse_undocumented
from ..problems import (
    BadRequest,
    Forbidden,
    Problem,
    cut_short,
    handle_redis_error,
    handle_unexpected,
    problem_response,
)
from ..requests import job_id_param, last_event_id, query_bool
from ..services import Cell, job_not_found, services
from ..sse import HEADERS, REPLAY_PAGE, Stream
from ..takeover import StreamConnection, can_take_over, pipelined_behind

logger = logging.getLogger(__name__)
#: A stream needs jobcast web's HTTP protocol (uvicorn's httptools one, taken over: jobcast.takeover).
NOT_JOBCAST_WEB = Problem(
    "Event streams are served by `jobcast web` (uvicorn with httptools, as jobcast.app.server_config "
    "configures it); this server runs the application otherwise. Start it with `jobcast web`."
)
PIPELINED = BadRequest(
    "Another request was sent behind this event stream on the same connection before the stream "
    "began (HTTP/1.1 pipelining). A stream holds its connection until it ends: open it on a "
    "connection of its own, or wait for its response head before sending more."
)
TENANT_HINT = "Close some, or follow many jobs over one GET /events stream."
Endpoint = Callable[[Request], Awaitable["StreamResponse | Response"]]


class StreamResponse:
    """The ASGI app of an opened stream: writes what the opening read, then lives as :class:`Stream`."""

    def __init__(self, stream: Stream, head: bytes, replay: list[Event]) -> None:
        self.stream, self.head, self.replay = stream, head, replay

    def take(self) -> tuple[bytes, list[Event], bool]:
        """The head and the first replay page, once (a stream lives for hours: not kept)."""
        head, replay, self.head, self.replay = self.head, self.replay, b"", []
        return head, replay, len(replay) >= REPLAY_PAGE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream.serve(send, self.take)

    # --- as jobcast.takeover.Opened: opened by the front protocol ---------------------------------

    @property
    def owner(self) -> Stream:
        return self.stream

    async def serve_on(self, connection: StreamConnection, http_head: bytes) -> None:
        await self.stream.adopt(connection, http_head, self.take)


async def job_events(request: Request) -> StreamResponse | Response:
    svc = services(request)
    job_id = job_id_param(request)
    principal = await svc.auth.require(request, "read", job_id=job_id)
    last_id = last_event_id(request)
    return await open_stream(svc.job_cell(job_id), principal.tenant, "job", job_id, last_id)


async def tenant_events(request: Request) -> StreamResponse | Response:
    svc = services(request)
    principal = await svc.auth.require(request, "read")
    if principal.kind == "job":
        raise Forbidden("A job token reads only its own job; use a stream token (POST /tokens) for GET /events.")
    last_id = last_event_id(request)
    overview = query_bool(request, "overview")
    cell = svc.tenant_cell(principal.tenant)
    return await open_stream(cell, principal.tenant, "tenant", principal.tenant, last_id, overview=overview)


async def open_stream(
    cell: Cell,
    tenant: str,
    audience: Audience,
    key: str,
    last_id: str | None,
    *,
    overview: bool = False,
) -> StreamResponse | Response:
    """Subscribe (to the hub of ``cell``, where the job or tenant lives), then check and read in one
    round trip; the stream's answer, or the problem. ``overview``: the tenant feed also carries
    ``overview`` events (:mod:`jobcast.overview`)."""
    slots = cell.stream_slots
    try:
        slots.reserve()
    except StreamsFull as full:
        raise streams_full_problem(full, what="event streams", tenant_hint="") from None
    slot = slots.new_slot()
    # Subscribed before the log is read: what is published meanwhile waits in the stream's backlog.
    stream = Stream(
        hub=cell.hub,
        store=cell.store,
        slots=slots,
        audience=audience,
        key=key,
        tenant=tenant,
        slot=slot,
        overview=cell.overview if overview else None,
    )
    opened = False
    try:
        await cell.hub.ready(tenant)  # confirmed by Redis before the log is read (jobcast.channels)
        outcome, tip, entries = await slots.open_log(audience, key, tenant, last_id, page=REPLAY_PAGE, slot=slot)
        if outcome == "over":
            return Response(status_code=204)  # the stream is over; EventSource stops reconnecting
        if outcome == "missing" and audience == "job":
            archived = await _archived_stream(cell, stream, tenant, key, last_id)
            if archived is not None:
                opened = isinstance(archived, StreamResponse)  # a 204 lets go of the stream (finally)
                return archived
        if outcome != "ok":
            raise _refusal(outcome, audience, key, last_id or "", tip, slots.per_tenant)
        opened = True
    finally:
        if not opened:
            stream.close()
            slots.unreserve()
    slots.opened(tenant, slot)
    head = retry_frame(cell.hub.config.retry_ms)
    if last_id is None and audience == "tenant" and tip:
        # Live from the log's tip as it is now that we are subscribed — sent before any event, so
        # a client that sees the headers sees every later event; the id alone says where it resumes.
        # Events up to the tip that the hub hands over late (published before the subscription,
        # still on their way) are older than it: dropped, as the client was told.
        head += position_frame(tip)
        stream.last_key = streamids.order(tip)
    replay = [Event(sid, fields["event"], fields["data"], fields.get("job", key)) for sid, fields in _pairs(entries)]
    if last_id is not None:
        stream.last_key = _order(last_id)
    return StreamResponse(stream, head, replay)


async def _archived_stream(
    cell: Cell, stream: Stream, tenant: str, job_id: str, last_id: str | None
) -> StreamResponse | Response | None:
    """The stream of a job that left Redis for the archive (finished): its log, replayed from the
    archive after ``last_id``, then the end; 204 when nothing follows ``last_id``. None: no such job
    for the tenant in the archive either. (It holds no tenant slot: it ends once written.)"""
    if await cell.store.get(job_id, tenant) is None:
        return None
    replay = await cell.store.log_events("job", job_id, after=last_id or "-", count=REPLAY_PAGE)
    if last_id is not None and not replay:
        return Response(status_code=204)
    if last_id is not None:
        stream.last_key = _order(last_id)
    return StreamResponse(stream, retry_frame(cell.hub.config.retry_ms), replay)


def _pairs(entries: list[list[object]]) -> list[tuple[str, dict[str, str]]]:
    pairs = []
    for sid, flat in entries:
        values = [str(v) for v in flat]  # type: ignore[attr-defined]
        pairs.append((str(sid), dict(zip(values[::2], values[1::2], strict=True))))
    return pairs


def _order(last_id: str) -> streamids.Order:
    order = streamids.parse(last_id)
    assert order is not None  # last_event_id() validated it
    return order


def _refusal(outcome: str, audience: Audience, key: str, last_id: str, tip: str, cap: int) -> Problem:
    if outcome == "missing":
        return job_not_found(key)
    if outcome == "full":
        return streams_full_problem(StreamsFull("tenant", cap), what="event streams", tenant_hint=TENANT_HINT)
    problem = resumes.refusal(outcome, last_id, tip, resumes.SSE)
    if problem is None:
        raise AssertionError(f"unknown stream opening outcome {outcome!r} ({audience} {key})")
    return problem


# --- raw ASGI dispatch ------------------------------------------------------------------------------


def match(path: str) -> tuple[Endpoint, dict[str, str]] | None:
    """The stream endpoint of a GET ``path`` and its path parameters, if it is a stream route."""
    if path == "/events":
        return tenant_events, {}
    if path.startswith("/jobs/") and path.endswith("/events"):
        job_id = path[6:-7]
        if job_id and "/" not in job_id:
            return job_events, {"job_id": job_id}
    return None


class FrontStreams:
    """The stream routes as jobcast.takeover's front protocol opens them (:class:`jobcast.takeover.Opener`):
    the same endpoints, with a scope the protocol made; any answer but an opened stream is left to
    uvicorn's protocol, which asks the application again (so errors are answered in one place)."""

    headers = HEADERS

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: set[asyncio.Task[Any]] = app.requests

    def wants(self, path: str) -> bool:
        return match(path) is not None

    async def open(self, scope: dict[str, Any]) -> StreamResponse | None:
        matched = match(scope["path"])
        if matched is None:
            return None
        endpoint, params = matched
        scope["app"] = self.app
        scope["path_params"] = params
        query = self.app.stream_query[("GET", "/events" if not params else "/jobs/{job_id}/events")]
        request = Request(scope, _no_body)
        try:
            refuse_undocumented(request, query)
            answer = await endpoint(request)
        except Exception:  # answered (and logged) when uvicorn's path asks again
            return None
        return answer if isinstance(answer, StreamResponse) else None

    def cut_short(self, scope: dict[str, Any]) -> Problem:
        return cut_short(scope["method"], scope["path"])


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def serve(endpoint: Endpoint, query: frozenset[str], scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one stream request outside Starlette's stack, with the answers its handlers would give."""
    if not can_take_over(send):
        logger.error("event stream refused: this server is not jobcast web's (see jobcast.takeover)")
        await problem_response(NOT_JOBCAST_WEB)(scope, receive, send)
        return
    response = await _answer(endpoint, query, scope, receive)
    if isinstance(response, StreamResponse) and pipelined_behind(send):
        response.stream.let_go()
        response = problem_response(PIPELINED)
    await response(scope, receive, send)


async def _answer(
    endpoint: Endpoint, query: frozenset[str], scope: Scope, receive: Receive
) -> StreamResponse | Response:
    # A frame of its own: the Request is not kept for the stream's lifetime.
    request = Request(scope, receive)
    try:
        refuse_undocumented(request, query)
        return await endpoint(request)
    except Problem as exc:
        return problem_response(exc)
    except (RedisError, OSError) as exc:
        return await handle_redis_error(request, exc)
    except Exception as exc:
        return await handle_unexpected(request, exc)
