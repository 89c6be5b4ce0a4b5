"""The service's own operations (:mod:`jobcast.routes.service`)."""

from __future__ import annotations

from typing import Any

from .common import READ_SECURITY, TOKEN, json_content, param, problems


def paths() -> dict[str, Any]:
    return {
        "/job-types": {
            "get": {
                "summary": "The registered job types and their parameter schemas",
                "operationId": "listJobTypes",
                "security": READ_SECURITY,
                "parameters": [TOKEN],
                "responses": {
                    "200": {"description": "Job types.", "content": json_content("JobTypeList")},
                    **problems("401", "403"),
                },
            }
        },
        "/tokens": {
            "post": {
                "summary": "A short-lived read-only stream token for the tenant",
                "operationId": "createToken",
                "responses": {
                    "201": {"description": "The token.", "content": json_content("StreamToken")},
                    **problems("401", "403"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "operationId": "healthz",
                "security": [],
                "responses": {"200": {"description": "The process runs.", "content": json_content("Health")}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers (and, if asked, a worker is alive)",
                "operationId": "readyz",
                "security": [],
                "parameters": [
                    param(
                        "require_workers",
                        "query",
                        {"type": "string", "enum": ["true", "false"]},
                        "Also answer 503 when no worker sent a heartbeat in the last 30 s.",
                    ),
                ],
                "responses": {
                    "200": {"description": "Ready.", "content": json_content("Health")},
                    **problems("503"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "description": (
                    "Needs 'Authorization: Bearer <JOBCAST_METRICS_TOKEN>' when that is set. Without it, "
                    "a production server answers only when bound to a private address (403 otherwise)."
                ),
                "security": [],
                "responses": {
                    "200": {"description": "Prometheus text format.", "content": {"text/plain": {}}},
                    **problems("401", "403"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": READ_SECURITY,
                "parameters": [TOKEN],
                "responses": {
                    "200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}},
                    **problems("401", "403"),
                },
            }
        },
        "/asyncapi.json": {
            "get": {
                "summary": "The AsyncAPI 3.0 document of the event channels (SSE, WebSocket, webhooks)",
                "operationId": "asyncapi",
                "security": [],
                "responses": {"200": {"description": "AsyncAPI 3.0.", "content": {"application/json": {}}}},
            }
        },
        "/ws": {
            "get": {
                "summary": "WebSocket: many jobs, resume and cancel over one socket (frames: /asyncapi.json)",
                "operationId": "websocket",
                "security": READ_SECURITY,
                "parameters": [TOKEN],
                "responses": {
                    "101": {"description": "Switching Protocols: the socket is open (a WebSocket handshake)."},
                    **problems("401", "426", "429", "503"),
                },
            }
        },
        "/problems/{slug}": {
            "get": {
                "summary": "What a problem type URI names (the 'type' of every error response)",
                "operationId": "problemType",
                "security": [],
                "parameters": [
                    param("slug", "path", {"type": "string"}, "The last part of the type URI.", required=True)
                ],
                "responses": {
                    "200": {"description": "The problem type.", "content": json_content("ProblemType")},
                    **problems("404"),
                },
            }
        },
    }
