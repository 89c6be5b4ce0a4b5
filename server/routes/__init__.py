"""The HTTP endpoints, one module per resource; :func:`routes` is the whole table.

    jobs       /jobs, /jobs/{id}, /jobs/{id}/cancel, /jobs/{id}/result
    events     /jobs/{id}/events, /events
    webhooks   /jobs/{id}/deliveries, /webhooks/dead-letters, .../{webhook_id}/replay,
               /webhooks/destinations, .../{destination}/enable
    service    /job-types, /tokens, /healthz, /readyz, /metrics, /openapi.json, /asyncapi.json,
               /problems/{slug}
    (ws)       /ws, the WebSocket (:mod:`jobcast.ws`)

:mod:`jobcast.openapi` documents each of them, module by module.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route, WebSocketRoute

from ..ws.endpoint import upgrade_required, websocket_endpoint
from . import events, jobs, service, webhooks


def routes() -> list[BaseRoute]:
    return [
        Route("/jobs", jobs.jobs, methods=["GET", "POST"]),
        Route("/jobs/{job_id}", jobs.get_job, methods=["GET"]),
        Route("/jobs/{job_id}/cancel", jobs.cancel_job, methods=["POST"]),
        Route("/jobs/{job_id}/result", jobs.get_result, methods=["GET"]),
        Route("/jobs/{job_id}/events", events.job_events, methods=["GET"]),
        Route("/events", events.tenant_events, methods=["GET"]),
        Route("/jobs/{job_id}/deliveries", webhooks.job_deliveries, methods=["GET"]),
        Route("/webhooks/dead-letters", webhooks.list_dead_letters, methods=["GET"]),
        Route("/webhooks/dead-letters/{webhook_id}/replay", webhooks.replay_dead_letter, methods=["POST"]),
        Route("/webhooks/destinations", webhooks.list_destinations, methods=["GET"]),
        Route("/webhooks/destinations/{destination:path}/enable", webhooks.enable_destination, methods=["POST"]),
        Route("/job-types", service.list_job_types, methods=["GET"]),
        Route("/tokens", service.create_token, methods=["POST"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/readyz", service.readyz, methods=["GET"]),
        Route("/openapi.json", service.openapi, methods=["GET"]),
        Route("/asyncapi.json", service.asyncapi, methods=["GET"]),
        Route("/problems/{slug}", service.problem_type, methods=["GET"]),
        Route("/metrics", service.metrics, methods=["GET"]),
        WebSocketRoute("/ws", websocket_endpoint),
        Route("/ws", upgrade_required, methods=["GET"]),  # the same path, without the handshake
    ]
