"""The operations of the event streams (:mod:`jobcast.routes.events`)."""

from __future__ import annotations

from typing import Any

from .common import JOB_ID, LAST_EVENT_ID, READ_SECURITY, SSE, TOKEN, param, problems

RESUME = (
    "Resume after this event id (one this stream sent). Malformed, or ahead of the stream's newest "
    "event: 400; older than the log keeps: 410."
)


def paths() -> dict[str, Any]:
    return {
        "/jobs/{job_id}/events": {
            "get": {
                "summary": "Server-Sent Events of one job (history, then live; ends after the terminal event)",
                "operationId": "jobEvents",
                "security": READ_SECURITY,
                "parameters": [
                    JOB_ID,
                    param("Last-Event-ID", "header", {"type": "string"}, RESUME),
                    LAST_EVENT_ID,
                    TOKEN,
                ],
                "responses": {
                    "200": {"description": "The event stream.", "content": SSE},
                    "204": {
                        "description": "The stream already ended: the job is finished and nothing follows "
                        "Last-Event-ID (an id ahead of the log included)."
                    },
                    **problems("400", "401", "403", "404", "410", "429", "503"),
                },
            }
        },
        "/events": {
            "get": {
                "summary": "Server-Sent Events of all the tenant's jobs (live, resumable)",
                "operationId": "tenantEvents",
                "security": READ_SECURITY,
                "parameters": [
                    param("Last-Event-ID", "header", {"type": "string"}, RESUME),
                    LAST_EVENT_ID,
                    TOKEN,
                    param(
                        "overview",
                        "query",
                        {"type": "boolean", "default": False},
                        "Also send `overview` events (no id; data: the Overview schema): the tenant's jobs by "
                        "status, workers alive and queue depth, when the stream opens, at most once a second "
                        "after job events, and every 10 s.",
                    ),
                ],
                "responses": {
                    "200": {"description": "The event stream.", "content": SSE},
                    **problems("400", "401", "403", "410", "429", "503"),
                },
            }
        },
    }
