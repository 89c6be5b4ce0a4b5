"""The operations of deliveries, dead letters and destinations (:mod:`jobcast.routes.webhooks`)."""

from __future__ import annotations

from typing import Any

from .common import JOB_ID, READ_SECURITY, TOKEN, json_content, param, problems


def paths() -> dict[str, Any]:
    return {
        "/jobs/{job_id}/deliveries": {
            "get": {
                "summary": "The webhook deliveries of a job, with every attempt",
                "operationId": "jobDeliveries",
                "security": READ_SECURITY,
                "parameters": [JOB_ID, TOKEN],
                "responses": {
                    "200": {"description": "Deliveries, oldest first.", "content": json_content("DeliveryList")},
                    **problems("401", "403", "404", "503"),
                },
            }
        },
        "/webhooks/dead-letters": {
            "get": {
                "summary": "The tenant's deliveries that exhausted their retries",
                "operationId": "listDeadLetters",
                "parameters": [
                    param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}, "At most this many."),
                ],
                "responses": {
                    "200": {"description": "Dead letters.", "content": json_content("DeadLetterList")},
                    **problems("400", "401", "403"),
                },
            }
        },
        "/webhooks/dead-letters/{webhook_id}/replay": {
            "post": {
                "summary": "Try a dead letter again (fresh schedule, same webhook-id)",
                "operationId": "replayDeadLetter",
                "parameters": [param("webhook_id", "path", {"type": "string"}, "The delivery's id.", required=True)],
                "responses": {
                    "202": {"description": "Queued for delivery.", "content": json_content("Replayed")},
                    **problems("401", "403", "404"),
                },
            }
        },
        "/webhooks/destinations": {
            "get": {
                "summary": "The tenant's webhook destinations with their health",
                "operationId": "listDestinations",
                "parameters": [
                    param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "At most this many."),
                ],
                "responses": {
                    "200": {
                        "description": "Destinations, most recently used first.",
                        "content": json_content("DestinationList"),
                    },
                    **problems("400", "401", "403"),
                },
            }
        },
        "/webhooks/destinations/{destination}/enable": {
            "post": {
                "summary": "Enable a destination again (its deliveries are sent again; replay its dead letters)",
                "operationId": "enableDestination",
                "parameters": [
                    param(
                        "destination",
                        "path",
                        {"type": "string"},
                        "scheme://host:port, percent-encoded or not; the default port may be left out.",
                        required=True,
                    )
                ],
                "responses": {
                    "200": {"description": "Enabled.", "content": json_content("Destination")},
                    **problems("401", "403", "404"),
                },
            }
        },
    }
