"""The operations of /jobs (:mod:`jobcast.routes.jobs`)."""

from __future__ import annotations

from typing import Any

from jobcast.worker.models import JobStatus
from jobcast.worker.types import Registry

from ..resources import JOB_ID_PATTERN
from .common import JOB_ID, READ_SECURITY, TOKEN, json_content, param, problems


def paths(registry: Registry) -> dict[str, Any]:
    return {
        "/jobs": {
            "post": {
                "summary": "Submit a job",
                "operationId": "submitJob",
                "parameters": [
                    param(
                        "Idempotency-Key",
                        "header",
                        {"type": "string", "maxLength": 255},
                        "Same key and body within 24 h returns the original job.",
                    ),
                ],
                "requestBody": {"required": True, "content": json_content("Submission")},
                "responses": {
                    "202": {"description": "Accepted: the job's ticket.", "content": json_content("JobTicket")},
                    **problems("400", "401", "403", "413", "415", "422", "429", "503"),
                },
            },
            "get": {
                "summary": "List the tenant's jobs, newest first",
                "operationId": "listJobs",
                "security": READ_SECURITY,
                "parameters": [
                    param("status", "query", {"type": "string", "enum": [s.value for s in JobStatus]}, "Filter."),
                    param("type", "query", {"type": "string", "enum": [jt.name for jt in registry]}, "Filter."),
                    param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size."),
                    param(
                        "cursor",
                        "query",
                        {"type": "string", "pattern": JOB_ID_PATTERN},
                        "next_cursor of the previous page.",
                    ),
                    param(
                        "created_after",
                        "query",
                        {"type": "string", "format": "date-time"},
                        "Jobs created at or after this time (RFC 3339 with offset; millisecond precision).",
                    ),
                    param(
                        "created_before",
                        "query",
                        {"type": "string", "format": "date-time"},
                        "Jobs created strictly before this time.",
                    ),
                    param(
                        "q",
                        "query",
                        {"type": "string", "minLength": 3, "maxLength": 200, "pattern": "^[^\\x00]*$"},
                        "Text to find in the job's type or params (their JSON), case-insensitive.",
                    ),
                    TOKEN,
                ],
                "responses": {
                    "200": {"description": "A page of jobs.", "content": json_content("JobList")},
                    **problems("400", "401", "403", "503"),
                },
            },
        },
        "/jobs/{job_id}": {
            "get": {
                "summary": "A job's status, progress and history",
                "operationId": "getJob",
                "security": READ_SECURITY,
                "parameters": [
                    JOB_ID,
                    param(
                        "wait",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": 60},
                        "Hold the request until the job changes or this many seconds pass.",
                    ),
                    param("If-None-Match", "header", {"type": "string"}, "ETag of a version you have."),
                    TOKEN,
                ],
                "responses": {
                    "200": {"description": "The job.", "content": json_content("JobResource")},
                    "304": {"description": "Not modified since the given ETag."},
                    **problems("400", "401", "403", "404", "429", "503"),
                },
            }
        },
        "/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a job",
                "operationId": "cancelJob",
                "parameters": [JOB_ID],
                "responses": {
                    "200": {"description": "Was queued: now cancelled.", "content": json_content("JobResource")},
                    "202": {"description": "Running: cancellation requested.", "content": json_content("JobResource")},
                    **problems("401", "403", "404", "409", "503"),
                },
            }
        },
        "/jobs/{job_id}/result": {
            "get": {
                "summary": "A completed job's result (JSON, or CSV where the type has one)",
                "operationId": "getResult",
                "security": READ_SECURITY,
                "parameters": [JOB_ID, TOKEN],
                "responses": {
                    "200": {
                        "description": "The result.",
                        "content": {"application/json": {"schema": {}}, "text/csv": {"schema": {"type": "string"}}},
                    },
                    **problems("401", "403", "404", "406", "409", "503"),
                },
            }
        },
    }
