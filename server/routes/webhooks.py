"""The webhook endpoints: a job's deliveries, the tenant's dead letters with their replay, and the
tenant's destinations with their re-enabling.

``GET /jobs/{id}/deliveries`` is a job read (API key, the job's token, or a stream token of its
tenant); token readers see the URL without its path and query (:func:`jobcast.resources.redact_url`).
Dead letters span all of a tenant's jobs and their URLs, so listing and replaying them takes the
API key; another tenant's dead letter answers 404, like an unknown one. Destinations likewise: a
tenant sees and re-enables only its own (health is kept per tenant).

A destination in a path is ``scheme://host:port``, percent-encoded or not
(``/webhooks/destinations/https%3A%2F%2Fhooks.example.com%3A443/enable`` or
``/webhooks/destinations/https://hooks.example.com/enable``); the default port may be left out.
"""

from __future__ import annotations

from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response

from jobcast.worker.destinations import MAX_DESTINATION_LENGTH, destination_of
from jobcast.worker.webhooks import WEBHOOK_ID_RE, job_id_of

from ..problems import NotFound
from ..requests import job_id_param, query_int
from ..resources import json_response, redact_url
from ..services import Services, services

DEAD_LETTERS_DEFAULT_LIMIT = 100
DEAD_LETTERS_MAX_LIMIT = 500
DESTINATIONS_DEFAULT_LIMIT = 100
DESTINATIONS_MAX_LIMIT = 1000


async def job_deliveries(request: Request) -> Response:
    svc = services(request)
    job_id = job_id_param(request)
    principal = await svc.auth.require(request, "read", job_id=job_id)
    await svc.load_job(job_id, principal.tenant)
    items = await svc.job_cell(job_id).webhooks.for_job(job_id)
    if principal.kind != "key":  # a token reader sees where deliveries go, not the URL's secrets
        items = [{**item, "url": redact_url(item["url"])} for item in items]
    return json_response({"items": items})


async def list_dead_letters(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")  # API key only: see the module docstring
    limit = query_int(request, "limit", DEAD_LETTERS_DEFAULT_LIMIT, 1, DEAD_LETTERS_MAX_LIMIT)
    webhooks = svc.tenant_cell(principal.tenant).webhooks
    return json_response({"items": await webhooks.dead_letters(principal.tenant, limit)})


async def replay_dead_letter(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")
    webhook_id = str(request.path_params["webhook_id"])
    if not await _replay(svc, webhook_id, principal.tenant):
        raise NotFound(
            f"No dead letter {webhook_id[:100]!r} for this tenant (it may have been replayed already); "
            "GET /webhooks/dead-letters lists them."
        )
    job_id = job_id_of(webhook_id)
    deliveries = f"/jobs/{job_id}/deliveries"
    return json_response(
        {"id": webhook_id, "job_id": job_id, "status": "pending", "links": {"deliveries": deliveries}},
        202,
        headers={"Location": deliveries},
    )


async def _replay(svc: Services, webhook_id: str, tenant: str) -> bool:
    """Replay in the cell of the delivery's job (its id names it); False when there is none such."""
    if not WEBHOOK_ID_RE.fullmatch(webhook_id):
        return False
    index = svc.settings.placement.job_cell(job_id_of(webhook_id))
    return index is not None and await svc.cells[index].webhooks.replay(webhook_id, tenant)


async def list_destinations(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")
    limit = query_int(request, "limit", DESTINATIONS_DEFAULT_LIMIT, 1, DESTINATIONS_MAX_LIMIT)
    destinations = svc.tenant_cell(principal.tenant).destinations
    return json_response({"items": await destinations.for_tenant(principal.tenant, limit)})


async def enable_destination(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")
    raw = unquote(str(request.path_params["destination"]))
    try:
        name = destination_of(raw) if len(raw) <= MAX_DESTINATION_LENGTH else ""
    except ValueError:
        name = ""
    destinations = svc.tenant_cell(principal.tenant).destinations
    enabled = await destinations.enable(principal.tenant, name) if name else None
    if enabled is None:
        raise NotFound(
            f"No destination {raw[:100]!r} for this tenant. A destination is scheme://host:port of a webhook "
            "URL your jobs delivered to; GET /webhooks/destinations lists them."
        )
    return json_response(enabled)
