"""The event streams: ``/jobs/{id}/events`` (one job, replayed from its start) and ``/events``
(the tenant's feed, live), both resumable with Last-Event-ID."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from jobcast.worker.models import Audience

from ..problems import Forbidden, GoneProblem
from ..requests import job_id_param, last_event_id, query_bool
from ..services import Services, services
from ..sse import EventStream, Gone, StreamConfig, check_continuity


async def job_events(request: Request) -> Response | EventStream:
    svc = services(request)
    job_id = job_id_param(request)
    principal = await svc.auth.require(request, "read", job_id=job_id)
    last_id = last_event_id(request)
    record = await svc.load_job(job_id, principal.tenant)
    await _check_resumable(svc, "job", job_id, last_id)
    if record.terminal and last_id is not None:
        later = await svc.store.log_events("job", job_id, after=last_id, count=1)
        if not later:
            return Response(status_code=204)  # the stream is over; EventSource stops reconnecting
    return event_stream(svc, principal.tenant, "job", job_id, last_id)


async def tenant_events(request: Request) -> EventStream:
    svc = services(request)
    principal = await svc.auth.require(request, "read")
    if principal.kind == "job":
        raise Forbidden("A job token reads only its own job; use a stream token (POST /tokens) for GET /events.")
    last_id = last_event_id(request)
    overview = query_bool(request, "overview")
    await _check_resumable(svc, "tenant", principal.tenant, last_id)
    return event_stream(svc, principal.tenant, "tenant", principal.tenant, last_id, overview=overview)


async def _check_resumable(svc: Services, audience: Audience, key: str, last_id: str | None) -> None:
    if last_id is None:
        return
    try:
        await check_continuity(svc.store, audience, key, last_id)
    except Gone:
        raise GoneProblem(
            f"Events after {last_id} are no longer in the log (it is capped). Reconnect without "
            "Last-Event-ID, after reloading the current state with GET /jobs."
        ) from None


def event_stream(
    svc: Services, tenant: str, audience: Audience, key: str, last_id: str | None, *, overview: bool = False
) -> EventStream:
    """The stream of one job (replayed from its start without a last id) or of a tenant (live),
    with ``overview`` events when asked for."""
    return EventStream(
        hub=svc.hub,
        store=svc.store,
        audience=audience,
        key=key,
        last_id=last_id,
        replay=audience == "job",
        config=StreamConfig(ping_s=svc.settings.sse_ping_s, send_timeout_s=svc.settings.sse_send_timeout_s),
        slots=svc.stream_slots,
        tenant=tenant,
        overview=svc.overview if overview else None,
    )
