"""The service's own endpoints: job types, stream tokens, health, metrics, and its documents
(the OpenAPI document and the problem types its errors point at)."""

from __future__ import annotations

import asyncio
import hmac

from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from jobcast.worker.clock import rfc3339
from jobcast.worker.overview import WORKER_LIVE_S
from jobcast.worker.store import Store

from ..metrics import render as render_metrics
from ..problems import PROBLEM_TYPES, Forbidden, NotFound, Unauthorized, Unavailable
from ..requests import query_bool
from ..resources import Health, JobTypeInfo, JobTypeList, StreamToken, json_response
from ..services import services


async def list_job_types(request: Request) -> Response:
    svc = services(request)
    await svc.auth.require(request, "read")
    return json_response(
        JobTypeList(
            items=[
                JobTypeInfo(
                    name=jt.name,
                    description=jt.description,
                    params_schema=jt.params_schema(),
                    timeout_s=jt.timeout_s,
                    max_attempts=jt.max_attempts,
                    priority=jt.priority,
                    result_formats=["json", "csv"] if jt.csv else ["json"],
                )
                for jt in svc.registry
            ]
        )
    )


async def create_token(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")
    token, expires_at = svc.auth.mint(principal, "stream", svc.settings.stream_token_ttl_s)
    return json_response(StreamToken(token=token, expires_at=rfc3339(expires_at * 10**9)), 201)


async def metrics(request: Request) -> Response:
    """Metrics name tenants and job types: with JOBCAST_METRICS_TOKEN they need it, without one they
    are served only in development or by a server bound to a private address."""
    svc = services(request)
    token = svc.settings.metrics_token
    if token and not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
        raise Unauthorized("GET /metrics needs 'Authorization: Bearer <JOBCAST_METRICS_TOKEN>'.")
    if not token and not svc.metrics_open:
        raise Forbidden(
            "GET /metrics is closed: this production server listens on a public or wildcard address and "
            "JOBCAST_METRICS_TOKEN is not set. Set it and scrape with 'Authorization: Bearer <token>', or "
            "bind the server to a private address."
        )
    cells = svc.cells
    body = await render_metrics([c.store for c in cells], [c.hub for c in cells], cells[0].stream_slots)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """Read like ``/job-types``: it describes this deployment's job types and their parameters."""
    svc = services(request)
    await svc.auth.require(request, "read")
    return Response(svc.openapi, media_type="application/json")


async def asyncapi(request: Request) -> Response:
    """The AsyncAPI 3.0 document of the event channels (SSE, WebSocket, webhooks)."""
    return Response(services(request).asyncapi, media_type="application/json")


async def problem_type(request: Request) -> Response:
    """What a problem's ``type`` URI names: its status, title and when it happens."""
    slug = str(request.path_params["slug"])
    described = PROBLEM_TYPES.get(slug)
    if described is None:
        raise NotFound(f"No problem type {slug[:60]!r}; the types are listed in the OpenAPI document.")
    return json_response(described)


async def _live_workers(store: Store) -> int:
    await store.redis.ping()
    return await store.live_workers(WORKER_LIVE_S)


async def healthz(request: Request) -> Response:
    return json_response(Health(status="ok").model_dump(exclude_none=True))


async def readyz(request: Request) -> Response:
    """Ready when Redis answers (every cell's). The live workers are reported too — those of the
    cell that has the fewest, since a cell without any leaves its tenants' jobs waiting; with
    ``?require_workers=true`` having none is also a 503 (for monitors: a load balancer should keep
    routing reads and submissions to a server even while the workers are down)."""
    svc = services(request)
    require_workers = query_bool(request, "require_workers")
    try:
        async with asyncio.timeout(2.0):
            counts = await asyncio.gather(*(_live_workers(cell.store) for cell in svc.cells))
    except (RedisError, OSError, TimeoutError):
        raise Unavailable("Redis does not answer; this process cannot serve jobs until it does.") from None
    workers = min(counts)
    if workers == 0 and require_workers:
        where = f" in cell {counts.index(0)}" if len(counts) > 1 else ""
        raise Unavailable(
            f"No worker has sent a heartbeat in the last {WORKER_LIVE_S:g} s{where}: jobs would wait. "
            "Start `jobcast worker` (it serves every cell unless given --cells).",
            workers=0,
        )
    return json_response(Health(status="ready", redis="ok", workers=workers))
