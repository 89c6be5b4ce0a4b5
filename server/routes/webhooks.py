"""The webhook endpoints: a job's deliveries, and the tenant's dead letters with their replay.

``GET /jobs/{id}/deliveries`` is a job read (API key, the job's token, or a stream token of its
tenant); token readers see the URL without its path and query (:func:`jobcast.resources.redact_url`).
Dead letters span all of a tenant's jobs and their URLs, so listing and replaying them takes the
API key; another tenant's dead letter answers 404, like an unknown one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from jobcast.worker.webhooks import job_id_of

from ..problems import NotFound
from ..requests import job_id_param, query_int
from ..resources import json_response, redact_url
from ..services import services

DEAD_LETTERS_DEFAULT_LIMIT = 100
DEAD_LETTERS_MAX_LIMIT = 500


async def job_deliveries(request: Request) -> Response:
    svc = services(request)
    job_id = job_id_param(request)
    principal = await svc.auth.require(request, "read", job_id=job_id)
    await svc.load_job(job_id, principal.tenant)
    items = await svc.webhooks.for_job(job_id)
    if principal.kind != "key":  # a token reader sees where deliveries go, not the URL's secrets
        items = [{**item, "url": redact_url(item["url"])} for item in items]
    return json_response({"items": items})


async def list_dead_letters(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")  # API key only: see the module docstring
    limit = query_int(request, "limit", DEAD_LETTERS_DEFAULT_LIMIT, 1, DEAD_LETTERS_MAX_LIMIT)
    return json_response({"items": await svc.webhooks.dead_letters(principal.tenant, limit)})


async def replay_dead_letter(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.require(request, "write")
    webhook_id = str(request.path_params["webhook_id"])
    if not await svc.webhooks.replay(webhook_id, principal.tenant):
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
